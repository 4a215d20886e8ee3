/*
 * Minimal stand-in for Windows' bcryptprimitives.dll, for running Rust
 * programs under wine 8.0 (Debian 12), which does not ship that DLL.
 *
 * Rust's std (>= 1.78) imports ProcessPrng from bcryptprimitives.dll to fill
 * HashMap keys and the like. We implement it on top of RtlGenRandom
 * (advapi32!SystemFunction036), which wine does implement.
 *
 * Built by scripts/windows-test.sh with x86_64-w64-mingw32-gcc and copied into
 * the private wine prefix's drive_c/windows/system32. Test-only: never ship it.
 */
#include <windows.h>

/* advapi32!SystemFunction036, a.k.a. RtlGenRandom. Declared here rather than
 * via <ntsecapi.h> so that the name we link against is unambiguous. */
__declspec(dllimport) BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    /* RtlGenRandom takes a ULONG length: feed it in chunks. */
    while (len > 0) {
        ULONG chunk = len > 0x10000000u ? 0x10000000u : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    /* The real ProcessPrng is documented to always return TRUE. */
    return TRUE;
}

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved)
{
    (void)instance;
    (void)reason;
    (void)reserved;
    return TRUE;
}
