#ifndef NVIDIA_DRM_OS_INTERFACE_H
#define NVIDIA_DRM_OS_INTERFACE_H

#include <linux/types.h>

extern bool nv_drm_modeset_module_param;

int nv_drm_init(void);
void nv_drm_exit(void);

#endif
