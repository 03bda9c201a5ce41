# The nvidia-driver image: NVIDIA's user space and kernel module sources (never a linked
# proprietary module: those are made on the node, or by `update` before `docker commit`),
# the tools the program drives, Flatcar's image signing key, and the program itself.
#
# Build it from the repository root after preparing image-inputs/ (README, "The image"):
#
#   .venv/bin/pip wheel --wheel-dir image-inputs/wheelhouse .
#   docker build --build-arg DRIVER_VERSION=535.261.03 -t nvidia-driver:535.261.03 .
#
# image-inputs/ is the whole build context (.dockerignore): the wheelhouse (the program's wheel
# and its one dependency's, jeepney) and, optionally,
# flatcar-image-signing-key.asc (without it the key is fetched from FLATCAR_SIGNING_KEY_URL).
#
# The seed's workflow (README, "Plain Docker"): build the modules for a kernel in a
# container of this image, commit it with entrypoint `init`, run the committed image:
#
#   docker run --name nvidia-update --privileged --pid=host --network host \
#       -v /run/nvidia:/run/nvidia:rshared -v /etc/os-release:/host-etc/os-release:ro \
#       -v /etc/flatcar:/host-etc/flatcar:ro -v /usr/share/flatcar:/host-usr/share/flatcar:ro \
#       -v /lib/modules:/lib/modules:ro -v /dev:/dev \
#       -v /var/lib/nvidia-driver:/var/lib/nvidia-driver \
#       -v /var/cache/nvidia-driver:/var/cache/nvidia-driver \
#       -v /etc/nvidia-driver/modules:/drivers:ro \
#       -v /run/dbus/system_bus_socket:/run/dbus/system_bus_socket:ro \
#       nvidia-driver:535.261.03 update
#   docker commit --change 'ENTRYPOINT ["nvidia-driver","init"]' --change 'CMD []' \
#       nvidia-update "nvidia-driver:535.261.03-$(uname -r)"
#
# `update` needs only loop devices: where --privileged is refused (a VM whose engine
# lacks CAP_SYS_MODULE), `--cap-add SYS_ADMIN --cap-add MKNOD --device-cgroup-rule
# 'b 7:* rmw' --device-cgroup-rule 'c 10:237 rmw'` in its place is enough (the tests
# run it so). `update --sign KEY` takes KEY from a mount (-v /path/key.pem:/keys/key.pem:ro):
# a key on the container's own layer would be kept by `docker commit`, and is refused.
# On the node the committed image runs with --privileged --pid=host and the mounts of
# README, "The container contract":
#
#   docker run -d --name nvidia-driver --privileged --pid=host --restart=unless-stopped \
#       -v /run/nvidia:/run/nvidia:rshared -v /etc/os-release:/host-etc/os-release:ro \
#       -v /etc/flatcar:/host-etc/flatcar:ro -v /usr/share/flatcar:/host-usr/share/flatcar:ro \
#       -v /lib/modules:/lib/modules:ro -v /dev:/dev \
#       -v /var/lib/nvidia-driver:/var/lib/nvidia-driver \
#       -v /var/cache/nvidia-driver:/var/cache/nvidia-driver \
#       -v /etc/nvidia-driver/modules:/drivers:ro \
#       -v /run/dbus/system_bus_socket:/run/dbus/system_bus_socket:ro \
#       "nvidia-driver:535.261.03-$(uname -r)"

ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# The driver version; the build fails when the sources it installs are another version.
ARG DRIVER_VERSION=535.261.03
# Where the driver comes from:
#   nvidia  NVIDIA's .run: user space installed with --no-kernel-module, its kernel/ and
#           kernel-open/ trees (closed core objects included), supported-gpus.json, firmware.
#   debian  Debian's packages of DRIVER_VERSION (contrib, non-free, non-free-firmware): the
#           user space, firmware-nvidia-gsp, nvidia-kernel-source, nvidia-open-kernel-source.
#           Debian ships nvidia-persistenced only at its own version (535.171.04 in bookworm).
ARG DRIVER_SOURCE=nvidia
ARG DRIVER_BASE_URL=https://us.download.nvidia.com/tesla
ARG FLATCAR_SIGNING_KEY_URL=https://www.flatcar.org/security/image-signing-key/Flatcar_Image_Signing_Key.asc
ARG DEBIAN_FRONTEND=noninteractive

# DRIVER_VERSION and NVIDIA_DRIVER_SOURCE are what the program reads (README, "Configuration");
# the precompiled packages go to NVIDIA_DRIVER_SOURCE/kernel/precompiled, the image's store.
# NVIDIA_VISIBLE_DEVICES=void: the container toolkit must not inject a driver into this image.
ENV DRIVER_VERSION=${DRIVER_VERSION} \
    NVIDIA_DRIVER_SOURCE=/usr/src/nvidia-${DRIVER_VERSION} \
    NVIDIA_VISIBLE_DEVICES=void

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The programs nvidia-driver runs (README, "Dependencies"): kmod (modprobe, rmmod, depmod,
# modinfo), mount (mount, umount, losetup), util-linux (findmnt; ionice, and coreutils' nice, for
# the builds ahead), fdisk (sfdisk), gpg and gpgv
# (Flatcar's signatures), lbzip2 (the developer container), binutils (ld: links the modules
# when no linker of the developer container is saved in NVIDIA_DRIVER_CACHE); python3 and
# ca-certificates (HTTPS downloads); xz-utils unpacks the driver; gpg-agent and gpgconf
# (`update --push` signs packages with the fleet's key: gpg needs its agent, gpgconf stops
# it). The base image's updates
# decide these versions, so they are not pinned; the driver's packages are (DRIVER_VERSION).
# `apt-get clean`: a base image without Debian's docker-clean hook keeps the downloaded
# packages and apt's caches in the layer otherwise.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        binutils ca-certificates fdisk gpg gpg-agent gpgconf gpgv kmod lbzip2 mount \
        python3 python3-venv util-linux xz-utils \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /tmp

# The driver, before anything of the build context: its layer does not change with the
# program or the signing key. It is fetched with the image's own Python: no download tool
# is added to the image. NVIDIA's .run is only fetched (DRIVER_BASE_URL may be a local
# server), never copied in from the build context: a COPY would keep the whole installer
# in a layer. Debian's packages are pinned to DRIVER_VERSION by an apt preference (the
# `debian` case), not on the command line.
# hadolint ignore=DL3008
RUN src="${NVIDIA_DRIVER_SOURCE}" \
 && firmware="/usr/lib/firmware/nvidia/${DRIVER_VERSION}" \
 && mkdir -p "$src/supported-gpus" \
 && case "${DRIVER_SOURCE}" in \
    nvidia) \
        run="NVIDIA-Linux-$(uname -m)-${DRIVER_VERSION}" \
        && python3 -c 'import shutil, sys, urllib.request as u; shutil.copyfileobj(u.urlopen(sys.argv[1], timeout=300), sys.stdout.buffer)' \
               "${DRIVER_BASE_URL}/${DRIVER_VERSION}/$run.run" > "/tmp/$run.run" \
        && sh "/tmp/$run.run" --silent --no-kernel-module --no-nouveau-check \
               --no-nvidia-modprobe --no-rpms --no-backup --no-check-for-alternate-installs \
               --no-libglx-indirect --no-install-libglvnd \
               --x-prefix=/tmp/null --x-module-path=/tmp/null --x-library-path=/tmp/null \
               --x-sysconfig-path=/tmp/null \
        && sh "/tmp/$run.run" --extract-only \
        && mv "/tmp/$run/kernel" "/tmp/$run/kernel-open" "/tmp/$run/LICENSE" "$src/" \
        && cp "/tmp/$run/supported-gpus/supported-gpus.json" "$src/supported-gpus/" \
        && install -D -m 0644 -t "$firmware" "/tmp/$run/firmware/"*.bin \
        ;; \
    debian) \
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do \
            [[ ! -f "$f" ]] || sed -Ei 's/^(deb\s.*\smain)$/\1 contrib non-free non-free-firmware/' "$f"; \
        done \
        && for f in /etc/apt/sources.list.d/*.sources; do \
            [[ ! -f "$f" ]] || sed -Ei 's/^(Components:\s*main)$/\1 contrib non-free non-free-firmware/' "$f"; \
        done \
        && printf 'Package: *nvidia* libcuda*\nPin: version %s-*\nPin-Priority: 1001\n' \
            "${DRIVER_VERSION}" > /etc/apt/preferences.d/nvidia-driver \
        && apt-get update \
        && apt-get install -y --no-install-recommends \
               firmware-nvidia-gsp libcuda1 libnvidia-ml1 nvidia-persistenced nvidia-smi \
               nvidia-kernel-source nvidia-open-kernel-source \
        && apt-get download nvidia-driver \
        && dpkg-deb --fsys-tarfile /tmp/nvidia-driver_*.deb \
           | tar -xO ./usr/share/doc/nvidia-driver/supported-gpus.json.gz \
           | gunzip > "$src/supported-gpus/supported-gpus.json" \
        && tar -C /tmp -xJf /usr/src/nvidia-kernel.tar.xz \
        && tar -C /tmp -xJf /usr/src/nvidia-open-kernel.tar.xz \
        && mv /tmp/modules/nvidia-kernel "$src/kernel" \
        && mv /tmp/modules/nvidia-open-kernel "$src/kernel-open" \
        && apt-get purge -y nvidia-kernel-source nvidia-open-kernel-source \
        && apt-get clean \
        && rm -rf /var/lib/apt/lists/* \
        ;; \
    *) \
        echo "DRIVER_SOURCE=${DRIVER_SOURCE}: expected nvidia or debian" >&2; exit 2 ;; \
    esac \
 && find /tmp -mindepth 1 -maxdepth 1 -exec rm -rf {} + \
 && for tree in kernel kernel-open; do \
        grep -Fq "NV_VERSION_STRING=\\\"${DRIVER_VERSION}\\\"" "$src/$tree/Kbuild" \
        || { echo "$src/$tree is not driver ${DRIVER_VERSION}" >&2; exit 1; }; \
    done \
 && test -s "$src/supported-gpus/supported-gpus.json" \
 && ls "$firmware/"gsp_*.bin \
 && if find / -xdev -name 'nvidia*.ko*' | grep .; then \
        echo 'a linked NVIDIA kernel module is in the image' >&2; exit 1; \
    fi

COPY image-inputs/ /tmp/image-inputs/

# Flatcar's image signing key: the build context's copy, else Flatcar's published one.
# The program, from the wheels built beforehand: an offline, reproducible install.
RUN key=/usr/share/nvidia-driver/flatcar-image-signing-key.asc \
 && mkdir -p "${key%/*}" \
 && if [[ -f /tmp/image-inputs/flatcar-image-signing-key.asc ]]; then \
        cp /tmp/image-inputs/flatcar-image-signing-key.asc "$key"; \
    else \
        python3 -c 'import shutil, sys, urllib.request as u; shutil.copyfileobj(u.urlopen(sys.argv[1], timeout=300), sys.stdout.buffer)' \
            "${FLATCAR_SIGNING_KEY_URL}" > "$key"; \
    fi \
 && gpg --batch --no-options --homedir /tmp --show-keys --with-fingerprint "$key" \
 && python3 -m venv /opt/nvidia-driver \
 && /opt/nvidia-driver/bin/pip install --no-cache-dir --no-index \
        --find-links /tmp/image-inputs/wheelhouse /tmp/image-inputs/wheelhouse/nvidia_driver-*.whl \
 && ln -s /opt/nvidia-driver/bin/nvidia-driver /usr/local/bin/nvidia-driver \
 && find /tmp -mindepth 1 -maxdepth 1 -exec rm -rf {} +

WORKDIR /
ENTRYPOINT ["nvidia-driver"]
