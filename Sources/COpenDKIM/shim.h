#ifndef TERN_COPENDKIM_SHIM_H
#define TERN_COPENDKIM_SHIM_H
// libopendkim, the reference DKIM implementation (Debian: libopendkim-dev).
// dkim.h uses u_char and _Bool from these without including them.
#include <sys/types.h>
#include <stdbool.h>
#include <stddef.h>
#include <opendkim/dkim.h>
#endif
