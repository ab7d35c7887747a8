#ifndef TERN_CCRYPTO_SHIM_H
#define TERN_CCRYPTO_SHIM_H
// OpenSSL's libcrypto (Debian: libssl-dev), for DKIM key generation.
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/bio.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

// BIO_get_mem_data is a macro; Swift cannot call it.
static inline long tern_bio_mem_data(BIO *bio, char **data) { return BIO_get_mem_data(bio, data); }
#endif
