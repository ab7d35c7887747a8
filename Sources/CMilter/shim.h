#ifndef TERN_CMILTER_SHIM_H
#define TERN_CMILTER_SHIM_H
// The milter protocol's numbers, from libmilter (Debian: libmilter-dev). Its command and
// reply codes are character macros, which Swift does not import; these constants carry them.
#include <stdint.h>
#include <libmilter/mfdef.h>
#include <libmilter/mfapi.h>

static const uint8_t TERN_SMFIA_UNKNOWN = SMFIA_UNKNOWN;
static const uint8_t TERN_SMFIA_UNIX = SMFIA_UNIX;
static const uint8_t TERN_SMFIA_INET = SMFIA_INET;
static const uint8_t TERN_SMFIA_INET6 = SMFIA_INET6;
static const uint8_t TERN_SMFIC_ABORT = SMFIC_ABORT;
static const uint8_t TERN_SMFIC_BODY = SMFIC_BODY;
static const uint8_t TERN_SMFIC_CONNECT = SMFIC_CONNECT;
static const uint8_t TERN_SMFIC_MACRO = SMFIC_MACRO;
static const uint8_t TERN_SMFIC_BODYEOB = SMFIC_BODYEOB;
static const uint8_t TERN_SMFIC_HELO = SMFIC_HELO;
static const uint8_t TERN_SMFIC_QUIT_NC = SMFIC_QUIT_NC;
static const uint8_t TERN_SMFIC_HEADER = SMFIC_HEADER;
static const uint8_t TERN_SMFIC_MAIL = SMFIC_MAIL;
static const uint8_t TERN_SMFIC_EOH = SMFIC_EOH;
static const uint8_t TERN_SMFIC_OPTNEG = SMFIC_OPTNEG;
static const uint8_t TERN_SMFIC_QUIT = SMFIC_QUIT;
static const uint8_t TERN_SMFIC_RCPT = SMFIC_RCPT;
static const uint8_t TERN_SMFIC_DATA = SMFIC_DATA;
static const uint8_t TERN_SMFIC_UNKNOWN = SMFIC_UNKNOWN;
static const uint8_t TERN_SMFIR_ADDRCPT = SMFIR_ADDRCPT;
static const uint8_t TERN_SMFIR_DELRCPT = SMFIR_DELRCPT;
static const uint8_t TERN_SMFIR_ADDRCPT_PAR = SMFIR_ADDRCPT_PAR;
static const uint8_t TERN_SMFIR_SHUTDOWN = SMFIR_SHUTDOWN;
static const uint8_t TERN_SMFIR_ACCEPT = SMFIR_ACCEPT;
static const uint8_t TERN_SMFIR_REPLBODY = SMFIR_REPLBODY;
static const uint8_t TERN_SMFIR_CONTINUE = SMFIR_CONTINUE;
static const uint8_t TERN_SMFIR_DISCARD = SMFIR_DISCARD;
static const uint8_t TERN_SMFIR_CHGFROM = SMFIR_CHGFROM;
static const uint8_t TERN_SMFIR_CONN_FAIL = SMFIR_CONN_FAIL;
static const uint8_t TERN_SMFIR_ADDHEADER = SMFIR_ADDHEADER;
static const uint8_t TERN_SMFIR_INSHEADER = SMFIR_INSHEADER;
static const uint8_t TERN_SMFIR_SETSYMLIST = SMFIR_SETSYMLIST;
static const uint8_t TERN_SMFIR_CHGHEADER = SMFIR_CHGHEADER;
static const uint8_t TERN_SMFIR_PROGRESS = SMFIR_PROGRESS;
static const uint8_t TERN_SMFIR_QUARANTINE = SMFIR_QUARANTINE;
static const uint8_t TERN_SMFIR_REJECT = SMFIR_REJECT;
static const uint8_t TERN_SMFIR_SKIP = SMFIR_SKIP;
static const uint8_t TERN_SMFIR_TEMPFAIL = SMFIR_TEMPFAIL;
static const uint8_t TERN_SMFIR_REPLYCODE = SMFIR_REPLYCODE;

#endif
