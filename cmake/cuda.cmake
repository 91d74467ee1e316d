# MGCL_CUDA=AUTO|ON|OFF decides whether mgcl._C_cuda is built.
#   AUTO (default): build it when a CUDA compiler (nvcc) is found.
#   ON:             build it, and fail clearly when no nvcc is found.
#   OFF:            never build it.
# MGCL_CUDA_ARCHS overrides the architecture list. The default compiles real
# code for sm_80 (A100) and sm_90 (H100/H200) plus PTX for sm_90, so newer
# cards JIT from PTX. cudart is linked statically: no shared libcudart.
set(MGCL_CUDA "AUTO" CACHE STRING "Build mgcl._C_cuda: AUTO, ON or OFF")
set_property(CACHE MGCL_CUDA PROPERTY STRINGS AUTO ON OFF)
string(TOUPPER "${MGCL_CUDA}" _mgcl_cuda_mode)
if(NOT _mgcl_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "MGCL_CUDA must be AUTO, ON or OFF (got '${MGCL_CUDA}')")
endif()

set(MGCL_CUDA_ARCHS "80-real;90-real;90-virtual" CACHE STRING "CUDA architectures for mgcl._C_cuda")
set(MGCL_BUILD_CUDA OFF)

if(NOT _mgcl_cuda_mode STREQUAL "OFF")
  # check_language runs a throwaway project; give it our architectures so it
  # does not probe for a default that a new toolkit may no longer support.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "${MGCL_CUDA_ARCHS}")
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(MGCL_BUILD_CUDA ON)
  elseif(_mgcl_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR
      "MGCL_CUDA=ON, but no CUDA compiler was found. Put nvcc on PATH (or set "
      "CUDACXX / CMAKE_CUDA_COMPILER), or build with MGCL_CUDA=AUTO or OFF to "
      "build the CPU module alone.")
  else()
    message(STATUS "mgcl: no CUDA compiler found; building mgcl._C only (MGCL_CUDA=AUTO)")
  endif()
endif()

if(MGCL_BUILD_CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "mgcl: building mgcl._C_cuda with nvcc ${CMAKE_CUDA_COMPILER_VERSION} for ${MGCL_CUDA_ARCHS}")
endif()
