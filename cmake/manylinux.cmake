# Wheels that load on an older glibc than the build machine's.
#
# MGCL_GLIBC_STUBS=DIR (empty by default) links both modules against the stub
# libraries in DIR, made by scripts/build_wheels.sh for glibc 2.28
# (manylinux_2_28, the floor of RHEL/Rocky 8 and of torch's own wheels):
# libc.so.6, libm.so.6, libpthread.so.0, libdl.so.2, librt.so.1 and
# ld-linux-x86-64.so.2 holding only the symbols and symbol versions glibc 2.28
# exports, plus the link names (libc.so, libm.so, ...). Every glibc symbol then
# binds to its 2.28 version, e.g. pthread_create@GLIBC_2.2.5 in libpthread.so.0
# where the build machine's glibc would give pthread_create@GLIBC_2.34 in
# libc.so.6 (the static cudart calls 46 such functions: 32 pthread_*, 6 dl*,
# 6 sem_*, 2 shm_*).
# With it:
# - libstdc++ is linked statically and every symbol but PyInit_* kept local
#   (--exclude-libs, module.map):
#   gcc 12's headers call libstdc++ symbols newer than the 2_28 policy allows
#   (std::__throw_bad_array_new_length, GLIBCXX_3.4.29;
#   exception_ptr::_M_addref/_M_release, CXXABI_1.3.13);
# - --gc-sections drops the unused parts of the static libstdc++ that call
#   glibc functions 2.28 lacks (arc4random, glibc 2.36, in std::random_device,
#   which cow-string-inst.o drags in); libgcc stays shared (libgcc_s.so.1 is in
#   every manylinux policy), since its static unwinder calls _dl_find_object
#   (glibc 2.35);
# - glibc_compat.cpp defines __libc_single_threaded, a glibc 2.32 variable
#   that libstdc++ reads (see that file).
# Compiler and code-generation flags are untouched: the same objects, linked
# differently. In a manylinux_2_28 image (the release workflow) the system
# glibc is 2.28 already and this stays empty.
set(MGCL_GLIBC_STUBS "" CACHE PATH "Directory of glibc stub libraries to link against (wheel builds)")

function(mgcl_glibc_floor target)
  if(NOT MGCL_GLIBC_STUBS)
    return()
  endif()
  if(NOT EXISTS "${MGCL_GLIBC_STUBS}/libc.so")
    message(FATAL_ERROR "MGCL_GLIBC_STUBS=${MGCL_GLIBC_STUBS} holds no libc.so (make it with scripts/build_wheels.sh)")
  endif()
  target_sources(${target} PRIVATE ${CMAKE_SOURCE_DIR}/cmake/glibc_compat.cpp)
  # -L as a plain flag: a link directory would also land in the RPATH.
  target_link_options(${target} BEFORE PRIVATE "-L${MGCL_GLIBC_STUBS}" -static-libstdc++
                      "LINKER:--exclude-libs,ALL" "LINKER:--gc-sections"
                      "LINKER:--version-script=${CMAKE_SOURCE_DIR}/cmake/module.map")
endfunction()
