"""Which package fits the running kernel: by its vermagic and symbol CRCs, read from the
real modules and build trees of this machine's kernels (6.1's `.ko`, 6.12's `.ko.xz`),
never by `/proc/version`; and the kernel's own refusals told apart."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nvdriver.config import Config
from nvdriver.errors import DriverError, KernelAbiRefused
from nvdriver.host import KernelIdentity
from nvdriver.kmod.abi import RunningAbi
from nvdriver.kmod.modversions import MODULE_SUFFIXES, read_modinfo, read_module, read_symvers
from nvdriver.kmod.refusal import load_error

# Imported by the NVIDIA modules (and the stand-in) and by many of the host's modules.
SYMBOLS = ("_printk", "kfree", "__pci_register_driver", "mutex_lock", "__fentry__")


def real_modules(kernel: str) -> Path:
    return Path("/lib/modules") / kernel


def host_with_modules(tmp_path: Path, kernel: str, *, tree: bool) -> Config:
    """A HOST_ROOT whose /lib/modules/K holds the kernel's own modules (and, with `tree`,
    its build tree): what the container sees through the /lib/modules mount."""
    moddir = tmp_path / "host" / "lib" / "modules" / kernel
    moddir.mkdir(parents=True)
    (moddir / "kernel").symlink_to(real_modules(kernel) / "kernel")
    if tree:
        (moddir / "build").symlink_to(real_modules(kernel) / "build")
    (tmp_path / "host" / "proc").mkdir()
    (tmp_path / "host" / "proc" / "version").write_text(f"Linux version {kernel} (this build)\n")
    (moddir / "modules.dep").write_text("kernel/drivers/block/loop.ko:\n")
    return Config.from_env(
        {"HOST_ROOT": str(tmp_path / "host"), "NVIDIA_DRIVER_CACHE": str(tmp_path / "cache")}
    )


def package_kernel(kernel: str, **changed_crcs: int) -> KernelIdentity:
    """A package's identity as a build against the kernel's tree records it."""
    symvers = read_symvers(real_modules(kernel) / "build" / "Module.symvers")
    symbols = {name: symvers[name] for name in SYMBOLS if name in symvers}
    symbols.update(changed_crcs)
    loop = next((real_modules(kernel) / "kernel" / "drivers" / "block").glob("loop.ko*"))
    vermagic = read_module(loop).vermagic
    info = f"Linux version {kernel} (other build) #1 SMP PREEMPT_DYNAMIC Sat Nov 28 2026"
    return KernelIdentity(kernel, info).with_abi(vermagic, symbols)


def test_module_versions_are_read_as_modprobe_dumps_them_from_ko_and_ko_xz(kernel: str) -> None:
    """The `__versions` of a host module, compressed on 6.12 as on Flatcar: the same CRCs
    as `modprobe --dump-modversions` prints, and the vermagic modinfo prints."""
    loop = next((real_modules(kernel) / "kernel" / "drivers" / "block").glob("loop.ko*"))
    if kernel.startswith("6.12"):
        assert loop.name.endswith(".ko.xz"), "Debian's 6.12 modules are xz-compressed"
    facts = read_module(loop)
    dumped = subprocess.run(
        ["modprobe", "--dump-modversions", loop], capture_output=True, text=True, check=True
    ).stdout
    expected = {line.split()[1]: int(line.split()[0], 16) for line in dumped.splitlines()}
    assert facts.versions == expected and len(expected) > 10
    modinfo = subprocess.run(
        ["modinfo", "-F", "vermagic", loop], capture_output=True, text=True, check=True
    ).stdout
    assert facts.vermagic == modinfo.rstrip("\n")


def test_the_host_modules_give_the_running_kernels_crcs_without_a_build_tree(
    kernel: str, tmp_path: Path
) -> None:
    """A Flatcar node has no build tree: its modules' `__versions` are the evidence."""
    abi = RunningAbi(host_with_modules(tmp_path, kernel, tree=False), kernel)
    symvers = read_symvers(real_modules(kernel) / "build" / "Module.symvers")
    found = abi.crcs(SYMBOLS)
    assert found == {name: symvers[name] for name in SYMBOLS}
    assert abi.modules_read < 400, "GPU drivers first: most imports are found early"
    verdict = abi.fit(package_kernel(kernel))
    assert verdict.fits and verdict.checked == len(SYMBOLS), verdict


def test_another_build_of_the_release_fits_when_its_abi_is_the_kernels(
    kernel: str, tmp_path: Path
) -> None:
    """Flatcar's tree is another build (another UTS_VERSION) than the booted kernel: the
    package fits by its vermagic and CRCs."""
    for tree in (True, False):
        config = host_with_modules(tmp_path / str(tree), kernel, tree=tree)
        package = package_kernel(kernel)
        booted = KernelIdentity.from_build_tree(real_modules(kernel) / "build")
        assert package.version != booted.version
        assert RunningAbi(config, kernel).fit(package).fits


@pytest.mark.parametrize("tree", [True, False], ids=["build-tree", "modules-only"])
def test_another_crc_for_an_imported_symbol_does_not_fit_and_names_it(
    kernel: str, tmp_path: Path, tree: bool
) -> None:
    symvers = read_symvers(real_modules(kernel) / "build" / "Module.symvers")
    other = package_kernel(kernel, _printk=symvers["_printk"] ^ 0x5A5A5A5A)
    verdict = RunningAbi(host_with_modules(tmp_path, kernel, tree=tree), kernel).fit(other)
    assert not verdict.fits
    assert "_printk" in verdict.reason and "another ABI" in verdict.reason


def test_another_vermagic_or_release_does_not_fit(kernel: str, tmp_path: Path) -> None:
    abi = RunningAbi(host_with_modules(tmp_path, kernel, tree=False), kernel)
    package = package_kernel(kernel)
    odd = package.with_abi(f"{package.vermagic}preempt_rt ", dict(package.symbols))
    assert "vermagic" in abi.fit(odd).reason and not abi.fit(odd).fits
    other = KernelIdentity("6.1.0-1-amd64", package.version, package.vermagic, package.symbols)
    assert not abi.fit(other).fits


def test_without_evidence_the_kernels_own_check_decides(tmp_path: Path) -> None:
    """No host modules readable (no /lib/modules mount): release alone, said so."""
    config = Config.from_env({"HOST_ROOT": str(tmp_path)})
    package = KernelIdentity("6.12.1-flatcar", "x", "6.12.1-flatcar SMP", (("_printk", 1),))
    verdict = RunningAbi(config, "6.12.1-flatcar").fit(package)
    assert verdict.fits and verdict.checked == 0
    assert "the kernel's own check at load decides" in verdict.reason


def test_a_refusal_for_a_symbol_crc_or_the_vermagic_is_a_kernel_abi_refusal() -> None:
    crc = load_error(
        "nvidia",
        "modprobe: ERROR: could not insert 'nvidia': Invalid argument",
        [
            "nvidia: disagrees about version of symbol _printk",
            "nvidia: Unknown symbol _printk (err -22)",
        ],
        [],
    )
    assert isinstance(crc, KernelAbiRefused) and crc.exit_code == 1
    assert "disagrees about version of symbol _printk" in crc.message
    magic = load_error(
        "nvidia-uvm",
        "modprobe: ERROR: could not insert 'nvidia_uvm': Exec format error",
        ["nvidia_uvm: version magic '6.1.0-1 SMP' should be '6.1.0-57-amd64 SMP'"],
        [],
    )
    assert isinstance(magic, KernelAbiRefused) and "version magic" in magic.message


@pytest.mark.parametrize(
    ("stderr", "kernel_log"),
    [
        (
            "modprobe: ERROR: could not insert 'nvidia': Key was rejected by service",
            ["Loading of unsigned module is rejected"],
        ),
        (
            "modprobe: ERROR: could not insert 'nvidia': Operation not permitted",
            ["Lockdown: modprobe: unsigned module loading is restricted; see kernel_lockdown.7"],
        ),
        ("modprobe: ERROR: could not insert 'nvidia': Required key not available", []),
    ],
    ids=["sig_enforce", "lockdown", "unknown-key"],
)
def test_a_refusal_for_the_signature_says_so_and_what_to_do(stderr: str, kernel_log: list[str]):
    error = load_error("nvidia", stderr, kernel_log, [])
    assert type(error) is DriverError and error.exit_code == 1
    assert "refused nvidia for its signature" in error.message
    assert "--sign" in (error.hint or "") and "mokutil" in (error.hint or "")


def test_an_unsigned_module_that_only_taints_is_no_signature_refusal() -> None:
    error = load_error(
        "nvidia",
        "modprobe: ERROR: could not insert 'nvidia': No such device",
        ["nvidia: module verification failed: signature and/or required key missing"],
        [],
    )
    assert "signature" not in error.message


def every_module(kernel: str) -> int:
    tree = real_modules(kernel) / "kernel"
    return sum(1 for p in tree.rglob("*") if p.name.endswith(MODULE_SUFFIXES))


def test_host_modules_are_read_once_and_within_the_budget(kernel: str, tmp_path: Path) -> None:
    """A symbol no host module imports would cost a read of every module (4,000 here, at
    every start): reading stops at the budget, and what was read is not read again."""
    config = host_with_modules(tmp_path, kernel, tree=False)
    every = every_module(kernel)
    whole = RunningAbi(config, kernel, budget=float("inf"), keep=False)
    assert whole.crcs(["no_such_symbol_anywhere"]) == {}
    assert whole.modules_read == every
    bounded = RunningAbi(config, kernel, budget=0.2, keep=False)
    assert bounded.crcs(["no_such_symbol_anywhere"]) == {}
    assert 0 < bounded.modules_read < every
    read = bounded.modules_read
    assert bounded.crcs(["_printk", "another_missing_symbol"]).keys() == {"_printk"}
    assert bounded.modules_read == read, "spent: nothing more is read"


def test_the_next_command_goes_on_where_the_last_stopped_and_then_reads_nothing(
    kernel: str, tmp_path: Path
) -> None:
    """What a command read of the host modules is kept in the node's cache: the next one
    reads only the modules not read yet, and once all are read, a symbol that no host
    module imports is known to be nowhere without reading any."""
    config = host_with_modules(tmp_path, kernel, tree=False)
    every = every_module(kernel)
    package = package_kernel(kernel, no_such_symbol_anywhere=0x1234)
    first = RunningAbi(config, kernel, budget=0.2)
    verdict = first.fit(package)
    assert verdict.fits and 0 < first.modules_read < every
    reads = [first.modules_read]
    while sum(reads) < every:
        command = RunningAbi(config, kernel, budget=0.5)
        assert str(command.fit(package)) == str(verdict), "the same evidence, kept or read"
        assert command.modules_read > 0, "goes on where the last one stopped"
        reads.append(command.modules_read)
        assert len(reads) < every, "no progress"
    assert sum(reads) == every, "each module read once over all the commands"
    # A command whose budget ran out with the last module has not looked for more: the
    # next one finds none left and keeps that, so that no later one walks the tree again.
    index = config.cache_dir / "kernel-abi" / f"{kernel}.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "complete": False}))
    RunningAbi(config, kernel).crcs(["-"])
    kept = json.loads(index.read_text())
    assert kept["complete"] is True and kept["position"] == every
    done = RunningAbi(config, kernel, budget=0.0)
    assert done.fit(package).checked == verdict.checked and done.modules_read == 0
    assert done.crcs(["another_missing_symbol", "_printk"]).keys() == {"_printk"}
    assert [p.name for p in (config.cache_dir / "kernel-abi").iterdir()] == [f"{kernel}.json"]


@pytest.mark.parametrize("change", ["kernel-build", "modules", "corrupt", "unwritable"])
def test_what_was_kept_is_used_only_for_the_same_kernel_build_and_modules(
    kernel: str, tmp_path: Path, change: str
) -> None:
    """Another kernel build (another /proc/version: Flatcar's update with the same release),
    other module files (modules.dep rewritten) or a kept file that cannot be read: the
    modules are read again, and a correct verdict comes out. An unwritable cache keeps
    nothing and costs nothing but the reading."""
    config = host_with_modules(tmp_path, kernel, tree=False)
    package = package_kernel(kernel)
    index = config.cache_dir / "kernel-abi" / f"{kernel}.json"
    if change == "unwritable":
        config.cache_dir.mkdir()
        config.cache_dir.chmod(0o500)  # root ignores modes: a file where the directory goes
        (config.cache_dir / "kernel-abi").write_text("not a directory")
    first = RunningAbi(config, kernel)
    assert first.fit(package).fits and first.modules_read > 0
    if change == "kernel-build":
        config.host("/proc/version").write_text(f"Linux version {kernel} (another build)\n")
    elif change == "modules":
        (config.host("/lib/modules") / kernel / "modules.dep").write_text("rewritten:\n")
    elif change == "corrupt":
        index.write_text(index.read_text()[:100])
    else:
        assert not index.exists()
    again = RunningAbi(config, kernel)
    assert again.fit(package).fits
    assert again.modules_read == first.modules_read, "read again, the same modules"


def test_modules_read_in_threads_give_what_one_thread_reads(kernel: str, tmp_path: Path) -> None:
    """The host modules are read a few at a time in parallel threads: every module once,
    the same CRCs and vermagic as one thread reading them in order; a file that is no
    module is passed over in any thread."""
    config = host_with_modules(tmp_path, kernel, tree=False)
    (config.host("/lib/modules") / kernel / "extra").mkdir()
    (config.host("/lib/modules") / kernel / "extra" / "broken.ko").write_bytes(b"not ELF")
    one = RunningAbi(config, kernel, budget=float("inf"), keep=False, threads=1)
    many = RunningAbi(config, kernel, budget=float("inf"), keep=False, threads=4)
    assert one.crcs(["-"]) == many.crcs(["-"]) == {}
    assert one._scanned == many._scanned and one.vermagic() == many.vermagic() is not None
    assert one.modules_read == many.modules_read == every_module(kernel)


@pytest.mark.parametrize(
    "module", ["drivers/gpu/drm/nouveau/nouveau", "drivers/spi/spi-pxa2xx-platform"]
)
def test_modinfo_fields_are_read_as_modinfo_prints_them(kernel: str, module: str) -> None:
    """The fields a start reads of the linked modules (depends, softdep, srcversion,
    version) without running `modinfo`: 6.1's `.ko` mapped, 6.12's `.ko.xz` decompressed;
    one line per value, as `modinfo -F` prints them."""
    (path,) = (real_modules(kernel) / "kernel").glob(f"{module}.ko*")
    fields = read_modinfo(path)
    for field in ("depends", "softdep", "srcversion", "vermagic", "alias", "firmware", "license"):
        printed = subprocess.run(
            ["modinfo", "-F", field, path], capture_output=True, text=True, check=True
        ).stdout
        assert list(fields.get(field, ())) == printed.splitlines(), field
    assert any(value for f in ("depends", "softdep") for value in fields.get(f, ())), fields


def test_no_module_to_read_keeps_nothing(tmp_path: Path) -> None:
    """A node whose modules are not mounted (yet) keeps no scan: modules that appear later
    are read then."""
    (tmp_path / "lib" / "modules" / "6.12.1-flatcar" / "kernel").mkdir(parents=True)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "version").write_text("Linux version 6.12.1-flatcar\n")
    config = Config.from_env(
        {"HOST_ROOT": str(tmp_path), "NVIDIA_DRIVER_CACHE": str(tmp_path / "cache")}
    )
    assert RunningAbi(config, "6.12.1-flatcar").crcs(["_printk"]) == {}
    assert not (tmp_path / "cache" / "kernel-abi").exists()


def test_the_build_tree_is_read_only_for_what_the_kept_scan_lacks(
    kernel: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node that has read its modules once answers from that alone: the build tree's
    `Module.symvers` (megabytes) is read only for a symbol no host module imports, which
    only the tree has; both give the running kernel's CRCs."""
    config = host_with_modules(tmp_path, kernel, tree=True)
    symvers = read_symvers(real_modules(kernel) / "build" / "Module.symvers")
    RunningAbi(config, kernel, budget=float("inf")).crcs(["-"])
    kept = json.loads((config.cache_dir / "kernel-abi" / f"{kernel}.json").read_text())
    only_in_tree = min(symvers.keys() - kept["crcs"].keys())
    caplog.set_level("DEBUG", logger="nvdriver")
    abi = RunningAbi(config, kernel, budget=0.0)
    assert abi.fit(package_kernel(kernel)).checked == len(SYMBOLS)
    assert "Read the running kernel's CRCs" not in caplog.text
    assert abi.crcs([only_in_tree, *SYMBOLS]) == {
        name: symvers[name] for name in (only_in_tree, *SYMBOLS)
    }
    assert "Read the running kernel's CRCs" in caplog.text and abi.modules_read == 0


def test_a_kept_crc_that_is_no_number_counts_as_not_found(kernel: str, tmp_path: Path) -> None:
    """The kept file is taken as written (thousands of CRCs, not copied at each start): a
    value this module never writes is a symbol not found, never a traceback."""
    config = host_with_modules(tmp_path, kernel, tree=False)
    RunningAbi(config, kernel, budget=float("inf")).crcs(["-"])
    index = config.cache_dir / "kernel-abi" / f"{kernel}.json"
    kept = json.loads(index.read_text())
    kept["crcs"]["_printk"] = "0x1234"
    index.write_text(json.dumps(kept))
    abi = RunningAbi(config, kernel, budget=0.0)
    verdict = abi.fit(package_kernel(kernel))
    assert verdict.fits and verdict.checked == len(SYMBOLS) - 1, verdict
    assert "1 not found on the node" in verdict.reason
