"""The VM test harness: boots a Debian 12 or 13 guest under qemu to run a shell script as root.

Tests import it as `vm` (pytest puts tests/ on sys.path); see vm.py for how a run works.

    from vm import run_in_vm, vm_available

    result = run_in_vm("modprobe tls && cat /proc/net/tls_stat", tmp_path)
    assert result.exit_code == 0, result.explain()
"""

from .vm import (
    DEFAULT_SUITE,
    SUITES,
    VMError,
    VMImage,
    VMPanic,
    VMResult,
    VMTimeout,
    cache_directory,
    ensure_image,
    find_image,
    image_key,
    image_name,
    kernel_panic,
    qemu_command,
    run_in_vm,
    run_scenario,
    vm_available,
)

__all__ = [
    "DEFAULT_SUITE",
    "SUITES",
    "VMError",
    "VMImage",
    "VMPanic",
    "VMResult",
    "VMTimeout",
    "cache_directory",
    "ensure_image",
    "find_image",
    "image_key",
    "image_name",
    "kernel_panic",
    "qemu_command",
    "run_in_vm",
    "run_scenario",
    "vm_available",
]
