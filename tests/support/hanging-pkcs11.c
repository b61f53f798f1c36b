/*
 * A PKCS#11 module for the key server's tests: SoftHSM2 behind a C_Sign that hangs
 * while the file named by KEYLESS_TEST_HANG_FILE exists (an HSM that stops answering
 * without failing). Every other function is SoftHSM2's own. Built by the tests with
 * `cc -shared -fPIC`; loaded by the key server as its `module-path`.
 *
 * No PKCS#11 header is needed: the v2.40 function list is a CK_VERSION followed by 68
 * function pointers, of which C_Sign is the 44th (index 43).
 */
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>

#define SOFTHSM "/usr/lib/softhsm/libsofthsm2.so"
#define FUNCTIONS 68
#define C_SIGN 43

typedef unsigned long ck_rv;
struct function_list {
    unsigned char major, minor;
    void *fns[FUNCTIONS];
};
typedef ck_rv (*get_function_list_fn)(struct function_list **);
typedef ck_rv (*sign_fn)(unsigned long, unsigned char *, unsigned long, unsigned char *,
                         unsigned long *);

static struct function_list list;
static sign_fn softhsm_sign;

static ck_rv hanging_sign(unsigned long session, unsigned char *data, unsigned long len,
                          unsigned char *sig, unsigned long *sig_len) {
    const char *hang = getenv("KEYLESS_TEST_HANG_FILE");
    while (hang != NULL && access(hang, F_OK) == 0) {
        usleep(20000);
    }
    return softhsm_sign(session, data, len, sig, sig_len);
}

ck_rv C_GetFunctionList(struct function_list **out) {
    if (softhsm_sign == NULL) {
        /* RTLD_LOCAL: SoftHSM2's own symbols (its C_GetInterface) stay out of sight. */
        void *lib = dlopen(SOFTHSM, RTLD_NOW | RTLD_LOCAL);
        if (lib == NULL) {
            return 5; /* CKR_GENERAL_ERROR */
        }
        get_function_list_fn get = (get_function_list_fn)dlsym(lib, "C_GetFunctionList");
        struct function_list *inner = NULL;
        if (get == NULL || get(&inner) != 0 || inner == NULL) {
            return 5;
        }
        list = *inner;
        softhsm_sign = (sign_fn)list.fns[C_SIGN];
        list.fns[C_SIGN] = (void *)hanging_sign;
    }
    *out = &list;
    return 0;
}
