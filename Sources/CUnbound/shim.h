#ifndef TERN_CUNBOUND_SHIM_H
#define TERN_CUNBOUND_SHIM_H
// libunbound: a validating, caching DNS resolver library (Debian: libunbound-dev).
// Its pkg-config file names libevent, which the library itself does not need here, so the
// module links it by name instead.
#include <unbound.h>
#endif
