"""`validate`: the seed's sample workloads, `nvidia-smi` and a CUDA vector add, on the driver root.

There is no GPU on this machine and there cannot be one, so where a test needs one it is
mocked, and each mock says so: a GPU on the PCI bus is a fake sysfs device under HOST_ROOT,
`nvidia-smi` is a shell script, and libcuda.so.1 is tests/unit/data/fake_libcuda.c, which does
the driver API's work on the host (its vector add adds the buffers it is given), so that a
wrong call, argument, size or copy in validate fails these tests. The real check runs on a GPU
machine. The PTX kernel itself is real and is assembled here with NVIDIA's `ptxas`.
"""

from __future__ import annotations

import ctypes.util
import importlib.resources
import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need, run_tool

FAKE_LIBCUDA = Path(__file__).parent / "data" / "fake_libcuda.c"
PTXAS = Path("/usr/local/cuda/bin/ptxas")
# Debian's layout (the image's DRIVER_SOURCE=debian): the libraries in nvidia/current, reached
# through absolute alternatives links that only resolve inside the driver root.
TRIPLET = f"{platform.machine()}-linux-gnu"
LIB = f"usr/lib/{TRIPLET}"
NVIDIA_LIB = f"{LIB}/nvidia/current"
NO_LEAKS = "contexts=0 modules=0 allocations=0\n"


def uuid(i: int) -> str:
    """The stand-in libcuda's UUID of device `i` (as nvidia-smi writes a GPU's)."""
    return f"GPU-5eed0000-0000-0000-0000-{i:012x}"


def smi_row(i: int, bus: int = 0x17, mig: str = "[N/A]", mode: str = "Default") -> str:
    """A row of nvidia-smi's CSV query for the stand-in's device `i`."""
    return f"{i}, NVIDIA H200, 00000000:{bus:02X}:00.0, 535.261.03, {uuid(i)}, {mig}, {mode}"


SMI_ROW = smi_row(0)
# What NVIDIA's nvidia-smi prints (on stdout) and its exit status, when it cannot load NVML
# and when the kernel driver does not answer.
NO_NVML = (
    12,
    "NVIDIA-SMI couldn't find libnvidia-ml.so library in your system. Please make sure "
    "that the NVIDIA Display Driver is properly installed and present in your system.",
)
NO_DRIVER = (
    9,
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure "
    "that the latest NVIDIA driver is installed and running.",
)


def fake_gpu(host: Path, address: str = "0000:17:00.0", driver: str | None = None) -> None:
    """A GPU as sysfs shows one, bound to `driver`, and its device node (mocked: there is
    no GPU here)."""
    dev = host / "sys/bus/pci/devices" / address
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x10de\n")
    (dev / "device").write_text("0x2335\n")
    (dev / "class").write_text("0x030200\n")
    if driver is not None:
        (host / "sys/bus/pci/drivers" / driver).mkdir(parents=True, exist_ok=True)
        (dev / "driver").symlink_to(f"../../../bus/pci/drivers/{driver}")
    (host / "dev").mkdir(exist_ok=True)
    (host / "dev/nvidia0").touch()


def link(root: Path, name: str, target: str) -> None:
    """An absolute link, as Debian's alternatives make: `target` is a path inside `root`."""
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).symlink_to(target)


def driver_root(
    root: Path,
    *,
    smi_rows: tuple[str, ...] = (SMI_ROW,),
    smi_fails: tuple[int, str] | None = None,
    smi_list: str = "",
    nvml: bool = True,
    libcuda: Path | None = None,
) -> Path:
    """A driver root with Debian's layout (mocked: its nvidia-smi is a script that needs
    libnvidia-ml.so.1 on its library path, as NVIDIA's does, and then prints `smi_rows` for
    the CSV query and `smi_list` for `-L`, or fails as NVIDIA's does with `smi_fails`);
    `libcuda`: the stand-in libcuda.so.1 to ship."""
    smi = root / "usr/lib/nvidia/current/nvidia-smi"
    smi.parent.mkdir(parents=True)
    status, message = smi_fails or (0, "")
    rows = "".join(f"echo '{r}'\n" for r in smi_rows)
    listing = f"if [ \"$1\" = -L ]; then printf '%s' '{smi_list}'; exit 0; fi\n"
    smi.write_text(
        "#!/bin/sh\n"
        'for d in $(echo "$LD_LIBRARY_PATH" | tr : " "); do\n'
        '  [ -f "$d/libnvidia-ml.so.1" ] && nvml=1\n'
        "done\n"
        f'[ -n "$nvml" ] || {{ echo "{NO_NVML[1]}"; exit {NO_NVML[0]}; }}\n'
        + (f'echo "{message}"; exit {status}\n' if smi_fails else listing + rows)
    )
    smi.chmod(0o755)
    link(root, "usr/bin/nvidia-smi", "/etc/alternatives/nvidia--nvidia-smi")
    link(root, "etc/alternatives/nvidia--nvidia-smi", "/usr/lib/nvidia/current/nvidia-smi")
    libs: dict[str, Path | None] = {"libcuda.so.1": libcuda} if libcuda else {}
    if nvml:
        libs["libnvidia-ml.so.1"] = None  # only looked for, never loaded: an empty file
    for soname, source in libs.items():
        (root / NVIDIA_LIB).mkdir(parents=True, exist_ok=True)
        if source is None:
            (root / NVIDIA_LIB / soname).touch()
        else:
            shutil.copy(source, root / NVIDIA_LIB / soname)
        link(root, f"{LIB}/{soname}", f"/etc/alternatives/{soname}-{TRIPLET}")
        link(root, f"etc/alternatives/{soname}-{TRIPLET}", f"/{NVIDIA_LIB}/{soname}")
    return root


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in libcuda.so.1 (mocked: there is no GPU here), built from fake_libcuda.c."""
    need(shutil.which("gcc") is not None, "gcc builds the stand-in libcuda")
    lib = tmp_path_factory.mktemp("cuda") / "libcuda.so.1"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-o", lib, FAKE_LIBCUDA],
        check=True,
    )
    return lib


def node(tmp_path: Path, **env: str) -> dict[str, str]:
    """The environment of a node whose host paths are under tmp_path/host (the driver root
    is their /run/nvidia/driver) and whose stand-in libcuda reports what it never freed."""
    return {
        "HOST_ROOT": str(tmp_path / "host"),
        "CONTAINER_ROOT": str(tmp_path / "unused"),
        "FAKE_CUDA_REPORT": str(tmp_path / "cuda-report"),
        **env,
    }


def exposed(tmp_path: Path) -> Path:
    return tmp_path / "host/run/nvidia/driver"


def validate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = run_tool("validate", env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_no_gpu_on_the_bus_is_exit_7_even_when_nvidia_smi_fails(tmp_path):
    (tmp_path / "host/sys/bus/pci/devices").mkdir(parents=True)
    driver_root(exposed(tmp_path), smi_fails=NO_DRIVER)
    result = validate(node(tmp_path))
    assert result.returncode == 7
    assert "no NVIDIA GPU on the PCI bus" in result.stderr


def test_nvidia_smi_missing_from_the_driver_root_is_exit_1(tmp_path):
    fake_gpu(tmp_path / "host")
    exposed(tmp_path).mkdir(parents=True)  # /run/nvidia/driver is there, but empty
    result = validate(node(tmp_path))
    assert result.returncode == 1
    assert f"There is no nvidia-smi in the driver root {exposed(tmp_path)}" in result.stderr


@pytest.mark.parametrize(("nvml", "failure"), [(True, NO_DRIVER), (False, NO_NVML)])
def test_nvidia_smi_failing_is_exit_1_with_its_message(tmp_path, nvml, failure):
    """nvidia-smi says why on stdout; without the root's libnvidia-ml.so.1 it cannot start."""
    fake_gpu(tmp_path / "host")
    driver_root(exposed(tmp_path), nvml=nvml, smi_fails=failure if nvml else None)
    result = validate(node(tmp_path))
    assert result.returncode == 1
    assert f"exited with status {failure[0]}" in result.stderr
    assert failure[1] in result.stderr


def test_nvidia_smi_missing_a_gpu_of_the_bus_fails(tmp_path):
    fake_gpu(tmp_path / "host")
    fake_gpu(tmp_path / "host", "0000:18:00.0")
    driver_root(exposed(tmp_path))
    result = validate(node(tmp_path))
    assert result.returncode == 1
    assert "nvidia-smi sees 1 GPU(s), the PCI bus has 2 for the driver" in result.stderr


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="a CUDA driver is here")
def test_without_libcuda_the_cuda_check_fails_clearly(tmp_path):
    fake_gpu(tmp_path / "host")
    driver_root(exposed(tmp_path))
    result = validate(node(tmp_path))
    assert result.returncode == 1
    assert "libcuda.so.1 cannot be loaded" in result.stderr


def expected_report(result: subprocess.CompletedProcess[str]) -> None:
    assert json.loads(result.stdout) == {
        "gpus": [
            {
                "index": "0",
                "name": "NVIDIA H200",
                "pci.bus_id": "00000000:17:00.0",
                "driver_version": "535.261.03",
                "uuid": uuid(0),
                "mig.mode.current": "[N/A]",
                "compute_mode": "Default",
            }
        ],
        "cuda": {
            "driver_version": 12020,
            "devices": [{"name": "NVIDIA H200", "uuid": uuid(0), "vector_add": "passed"}],
        },
    }


def test_nvidia_smi_and_a_vector_add_on_the_driver_root_validate(tmp_path, fake_libcuda):
    """libcuda.so.1 is the driver root's (not on any search path), reached through its
    Debian alternatives links; the stand-in's report proves everything was freed."""
    fake_gpu(tmp_path / "host")
    driver_root(exposed(tmp_path), libcuda=fake_libcuda)
    result = validate(node(tmp_path))
    assert result.returncode == 0, result.stderr
    expected_report(result)
    assert "GPU 0 (NVIDIA H200): vector add of" in result.stderr
    assert (tmp_path / "cuda-report").read_text() == NO_LEAKS


def test_without_an_exposed_root_the_container_root_and_the_default_search_are_used(
    tmp_path, fake_libcuda
):
    fake_gpu(tmp_path / "host")
    env = node(tmp_path, LD_LIBRARY_PATH=str(fake_libcuda.parent))
    env["CONTAINER_ROOT"] = str(driver_root(tmp_path / "root"))  # no libcuda of its own
    result = validate(env)
    assert result.returncode == 0, result.stderr
    expected_report(result)
    assert (tmp_path / "cuda-report").read_text() == NO_LEAKS


@pytest.mark.parametrize("device_node", [True, False])
def test_cuda_without_a_device_is_exit_7(tmp_path, fake_libcuda, device_node):
    """The stand-in's cuInit says CUDA_ERROR_NO_DEVICE, as libcuda does without a GPU."""
    fake_gpu(tmp_path / "host")
    if not device_node:
        (tmp_path / "host/dev/nvidia0").unlink()
    driver_root(exposed(tmp_path), libcuda=fake_libcuda)
    result = validate(node(tmp_path, FAKE_CUDA_DEVICES="0"))
    assert result.returncode == 7
    assert "CUDA finds no GPU: cuInit returned CUDA_ERROR_NO_DEVICE" in result.stderr
    assert ("There is no /dev/nvidia0" in result.stderr) is not device_node
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"FAKE_CUDA_WRONG": "1234"}, "element 1234 is "),
        ({"FAKE_CUDA_WRONG": "0"}, "element 0 is "),
        ({"FAKE_CUDA_CORRUPT": "1"}, "vector add on GPU 0 (NVIDIA H200) is wrong: element "),
        (
            {"FAKE_CUDA_DEVICES": "2"},
            "CUDA sees 2 device(s), nvidia-smi 1 GPU(s) of the driver; unknown to nvidia-smi: "
            f"NVIDIA H200 ({uuid(1).removeprefix('GPU-')})",
        ),
        (
            {"FAKE_CUDA_FAIL": "cuMemAlloc_v2:2"},
            "CUDA cuMemAlloc_v2 failed: CUDA_ERROR_OUT_OF_MEMORY (out of memory).",
        ),
        (
            {"FAKE_CUDA_FAIL": "cuLaunchKernel:700"},
            "CUDA cuLaunchKernel failed: CUDA_ERROR_ILLEGAL_ADDRESS (an illegal memory access",
        ),
        (
            {"FAKE_CUDA_FAIL": "cuModuleLoadData:200"},
            "CUDA cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE",
        ),
        ({"FAKE_CUDA_FAIL": "cuInit:999"}, "CUDA cuInit failed: error 999."),
    ],
)
def test_a_wrong_result_or_a_cuda_error_fails_and_frees_everything(
    tmp_path, fake_libcuda, fault, message
):
    fake_gpu(tmp_path / "host")
    driver_root(exposed(tmp_path), libcuda=fake_libcuda)
    result = validate(node(tmp_path, **fault))
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stdout == ""
    assert (tmp_path / "cuda-report").read_text() == NO_LEAKS


# --- healthy nodes that are not plain ---------------------------------------------------

MIG_A = "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"
MIG_B = "MIG-cba663e8-9bed-5b4f-a8d5-64ae4d2a7b5b"
# `nvidia-smi -L` of the stand-in's GPU 0 (plain) and GPU 1 (MIG enabled, two MIG devices),
# in the layout of NVIDIA's (MIG user guide, "Running CUDA Applications on Bare-Metal").
MIG_LIST = (
    f"GPU 0: NVIDIA H200 (UUID: {uuid(0)})\n"
    f"GPU 1: NVIDIA H200 (UUID: {uuid(1)})\n"
    f"  MIG 1g.18gb     Device  0: (UUID: {MIG_A})\n"
    f"  MIG 1g.18gb     Device  1: (UUID: {MIG_B})\n"
)


def mig_node(tmp_path: Path, fake_libcuda: Path) -> None:
    """GPU 0 plain, GPU 1 with MIG enabled and two MIG devices (mocked: no GPU here; CUDA
    enumerates only GPU 0 unless CUDA_VISIBLE_DEVICES names a MIG device)."""
    fake_gpu(tmp_path / "host", driver="nvidia")
    fake_gpu(tmp_path / "host", "0000:18:00.0", driver="nvidia")
    rows = (smi_row(0), smi_row(1, bus=0x18, mig="Enabled"))
    driver_root(exposed(tmp_path), smi_rows=rows, smi_list=MIG_LIST, libcuda=fake_libcuda)


def test_mig_gpus_list_their_mig_devices_and_say_why_the_vector_add_skips_them(
    tmp_path, fake_libcuda
):
    mig_node(tmp_path, fake_libcuda)
    result = validate(node(tmp_path, FAKE_CUDA_MIG=f"{MIG_A},{MIG_B}"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cuda"]["devices"] == [
        {"name": "NVIDIA H200", "uuid": uuid(0), "vector_add": "passed"}
    ]
    [skipped] = report["skipped"]
    assert skipped["gpu"] == "1" and skipped["uuid"] == uuid(1)
    assert skipped["mig_devices"] == [MIG_A, MIG_B]
    assert f"CUDA_VISIBLE_DEVICES={MIG_A}" in skipped["reason"]
    assert "GPU 1 (NVIDIA H200): no vector add: MIG is enabled" in result.stderr
    assert (tmp_path / "cuda-report").read_text() == NO_LEAKS


def test_a_mig_device_named_in_cuda_visible_devices_gets_the_vector_add(tmp_path, fake_libcuda):
    mig_node(tmp_path, fake_libcuda)
    env = node(tmp_path, FAKE_CUDA_MIG=f"{MIG_A},{MIG_B}", CUDA_VISIBLE_DEVICES=MIG_B)
    result = validate(env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cuda"]["devices"] == [
        {"name": "NVIDIA H200 MIG 1g.18gb", "uuid": MIG_B, "gpu": uuid(1), "vector_add": "passed"}
    ]
    [skipped] = report["skipped"]  # GPU 0, which CUDA_VISIBLE_DEVICES hides
    assert skipped == {
        "gpu": "0",
        "uuid": uuid(0),
        "reason": f"hidden by CUDA_VISIBLE_DEVICES={MIG_B}",
    }


def test_a_node_of_mig_gpus_only_passes_with_each_gpu_saying_why(tmp_path, fake_libcuda):
    """GPU 0 MIG with a MIG device, GPU 1 MIG without: CUDA enumerates nothing (its cuInit
    says CUDA_ERROR_NO_DEVICE), which is healthy here, not "no GPU"."""
    fake_gpu(tmp_path / "host")
    fake_gpu(tmp_path / "host", "0000:18:00.0")
    listing = (
        f"GPU 0: NVIDIA H200 (UUID: {uuid(0)})\n"
        f"  MIG 7g.141gb    Device  0: (UUID: {MIG_A})\n"
        f"GPU 1: NVIDIA H200 (UUID: {uuid(1)})\n"
    )
    rows = (smi_row(0, mig="Enabled"), smi_row(1, bus=0x18, mig="Enabled"))
    driver_root(exposed(tmp_path), smi_rows=rows, smi_list=listing, libcuda=fake_libcuda)
    result = validate(node(tmp_path, FAKE_CUDA_DEVICES="0", FAKE_CUDA_MIG=MIG_A))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cuda"]["devices"] == []
    first, second = report["skipped"]
    assert first["mig_devices"] == [MIG_A] and "MIG is enabled: CUDA" in first["reason"]
    assert second["mig_devices"] == []
    assert "MIG is enabled with no MIG devices" in second["reason"]


def test_gpus_bound_to_vfio_pci_are_named_not_counted(tmp_path, fake_libcuda):
    """A node whose second GPU is passed through to a VM (vfio-pci): nvidia-smi and CUDA
    see one GPU, and that is healthy."""
    fake_gpu(tmp_path / "host", driver="nvidia")
    fake_gpu(tmp_path / "host", "0000:18:00.0", driver="vfio-pci")
    driver_root(exposed(tmp_path), libcuda=fake_libcuda)
    result = validate(node(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["other_gpus"] == [{"address": "0000:18:00.0", "driver": "vfio-pci"}]
    assert [d["vector_add"] for d in report["cuda"]["devices"]] == ["passed"]
    assert "Not validating GPUs bound to another driver: 0000:18:00.0 (vfio-pci)" in result.stderr


def test_only_gpus_bound_to_vfio_pci_is_exit_7_naming_them(tmp_path):
    fake_gpu(tmp_path / "host", driver="vfio-pci")
    driver_root(exposed(tmp_path))
    result = validate(node(tmp_path))
    assert result.returncode == 7
    assert "bound to another driver: 0000:17:00.0 (vfio-pci)" in result.stderr


def test_an_exclusive_process_gpu_with_a_job_is_in_use_not_a_failure(tmp_path, fake_libcuda):
    """GPU 0 exclusive-process with another process's context (its cuCtxCreate says
    CUDA_ERROR_DEVICE_UNAVAILABLE), GPU 1 exclusive-process and free."""
    fake_gpu(tmp_path / "host")
    fake_gpu(tmp_path / "host", "0000:18:00.0")
    rows = (smi_row(0, mode="Exclusive_Process"), smi_row(1, bus=0x18, mode="Exclusive_Process"))
    driver_root(exposed(tmp_path), smi_rows=rows, libcuda=fake_libcuda)
    env = node(tmp_path, FAKE_CUDA_DEVICES="2", FAKE_CUDA_EXCLUSIVE="0,1", FAKE_CUDA_HELD="0")
    result = validate(env)
    assert result.returncode == 0, result.stderr
    devices = json.loads(result.stdout)["cuda"]["devices"]
    assert [d["vector_add"] for d in devices] == ["in use", "passed"]
    assert "another process holds its one context" in devices[0]["reason"]
    assert (tmp_path / "cuda-report").read_text() == NO_LEAKS


def test_a_busy_gpu_in_default_mode_is_still_a_failure(tmp_path, fake_libcuda):
    fake_gpu(tmp_path / "host")
    driver_root(exposed(tmp_path), libcuda=fake_libcuda)
    result = validate(node(tmp_path, FAKE_CUDA_FAIL="cuCtxCreate_v2:46"))
    assert result.returncode == 1
    assert "CUDA cuCtxCreate_v2 failed: CUDA_ERROR_DEVICE_UNAVAILABLE" in result.stderr


def test_the_vector_add_kernel_is_valid_ptx(tmp_path):
    """NVIDIA's assembler accepts the shipped kernel for Ampere and Hopper (the H200)."""
    ptxas = PTXAS if PTXAS.is_file() else shutil.which("ptxas")
    need(ptxas is not None, f"the CUDA toolkit's ptxas ({PTXAS}) assembles the PTX kernel")
    kernel = importlib.resources.files("nvdriver") / "data/vector_add.ptx"
    with importlib.resources.as_file(kernel) as ptx:
        for arch in ("sm_80", "sm_90"):
            out = tmp_path / f"{arch}.cubin"
            result = subprocess.run(
                [str(ptxas), f"-arch={arch}", "-o", str(out), str(ptx)],
                capture_output=True,
                text=True,
            )
            assert result.returncode == 0, result.stderr
            assert out.stat().st_size > 0
