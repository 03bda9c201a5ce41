/*
 * Stand-in for NVIDIA's resource manager core, nv-kernel.o_binary: the
 * OS-agnostic part of nvidia.ko that NVIDIA ships precompiled. Like it, this
 * is compiled without any kernel header (freestanding, no libc) and talks to
 * the kernel only through the interface layer: the interface calls the rm_*
 * entry points, the core calls back nvstandin_os_* (defined by the
 * interface). Built by tests/standin/tree.py, never by Kbuild.
 *
 * The version string comes from -DNV_VERSION_STRING="..."; -DNV_STANDIN_OPEN
 * selects the identification of the open kernel modules.
 */
#include "nv-standin-core.h"

#ifndef NV_VERSION_STRING
#error "NV_VERSION_STRING must be defined"
#endif

#if defined(NV_STANDIN_OPEN)
#define NVRM_ID_PREFIX "NVIDIA UNIX Open Kernel Module for x86_64  "
#else
#define NVRM_ID_PREFIX "NVIDIA UNIX x86_64 Kernel Module  "
#endif

const char *pNVRM_ID = NVRM_ID_PREFIX NV_VERSION_STRING "  Release Build  (nvidia-driver stand-in)";

static int rm_initialized;
static unsigned int rm_gpu_count;
static unsigned int rm_clients;

int rm_init_rm(void)
{
    if (rm_initialized)
        return -1;
    rm_initialized = 1;
    rm_gpu_count = 0;
    rm_clients = 0;
    return 0;
}

void rm_shutdown_rm(void)
{
    if (rm_clients != 0)
        nvstandin_os_log(NV_STANDIN_LOG_ERROR, "NVRM: shutting down with clients registered");
    rm_initialized = 0;
    rm_gpu_count = 0;
}

unsigned int rm_probe_devices(void)
{
    rm_gpu_count = nvstandin_os_count_gpus();
    return rm_gpu_count;
}

static int rm_is_key_char(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           c == '_';
}

static int rm_digit(char c, unsigned int base)
{
    unsigned int d;

    if (c >= '0' && c <= '9')
        d = (unsigned int)(c - '0');
    else if (c >= 'a' && c <= 'f')
        d = (unsigned int)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F')
        d = (unsigned int)(c - 'A' + 10);
    else
        return -1;
    return d < base ? (int)d : -1;
}

int rm_parse_registry_dwords(const char *s, rm_registry_cb cb, void *ctx)
{
    int count = 0;

    while (*s != '\0') {
        const char *key;
        unsigned int key_len = 0;
        unsigned int value = 0;
        unsigned int base = 10;
        int digits = 0;

        while (*s == ' ')
            s++;
        key = s;
        while (rm_is_key_char(*s)) {
            s++;
            key_len++;
        }
        if (key_len == 0 || *s != '=')
            return -1;
        s++;
        if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
            base = 16;
            s += 2;
        }
        for (;;) {
            int d = rm_digit(*s, base);

            if (d < 0)
                break;
            value = value * base + (unsigned int)d;
            digits++;
            s++;
        }
        if (digits == 0 || (*s != ';' && *s != '\0'))
            return -1;
        /* An indirect call, as the real core makes (through a retpoline thunk). */
        cb(ctx, key, key_len, value);
        count++;
        if (*s == ';')
            s++;
    }
    return count;
}

int rm_register_client(void)
{
    if (!rm_initialized)
        return -1;
    rm_clients++;
    return 0;
}

int rm_unregister_client(void)
{
    if (rm_clients == 0)
        return -1;
    rm_clients--;
    return 0;
}

unsigned int rm_client_count(void)
{
    return rm_clients;
}
