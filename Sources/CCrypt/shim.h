#ifndef TERN_CCRYPT_SHIM_H
#define TERN_CCRYPT_SHIM_H
#include <crypt.h>
#endif
