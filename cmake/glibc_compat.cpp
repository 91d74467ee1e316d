// Linked into the native modules only for wheels built against older glibc
// stubs (cmake/manylinux.cmake, MGCL_GLIBC_STUBS).
//
// libstdc++'s headers (gcc 11+) test `__libc_single_threaded`, a variable that
// glibc 2.32 added, to skip atomic instructions in reference counts (shared
// pointers, locales, exception_ptr) while a process has one thread; a module
// that reads it cannot load on glibc 2.28. This hidden definition shadows it
// inside the module with the constant answer "maybe multi-threaded", so every
// such count is atomic: what libstdc++ does on any glibc without the variable
// once libpthread is loaded (always, inside Python). Correct in every process;
// nothing numeric depends on it.
extern "C" __attribute__((visibility("hidden"))) char __libc_single_threaded = 0;
