"""The real check of GPU engines, on a machine with NVIDIA GPUs (skipped without nvidia-smi).

    python benchmarks/gpu_check.py            # a local cluster, gpu_engines = auto, 1 CPU engine

Starts a local cluster with ``gpu_engines = auto`` and ``cpu_engines = 1``.  Each GPU engine
proves it owns its GPU through the CUDA driver API alone (``ctypes`` on ``libcuda.so.1``, no
framework): ``cuInit``; ``cuDeviceGetCount`` is 1; ``cuDeviceGetUuid`` is the UUID it was
given; a kernel written in PTX, loaded with ``cuModuleLoadData`` and run with ``cuLaunchKernel``,
computes ``2*x + i`` over 1,024 values whose copy back is checked.  The CPU engine must see no
device (``cuDeviceGetCount`` is 0, or ``cuInit`` says there is none).  Prints one line per
engine and exits 1 if any check fails.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

PTX = r"""
.version 7.0
.target sm_70
.address_size 64
.visible .entry twice_plus_i(.param .u64 data, .param .u32 n)
{
    .reg .pred %p;
    .reg .b32 %r<6>;
    .reg .b64 %rd<5>;
    ld.param.u64 %rd1, [data];
    ld.param.u32 %r1, [n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r2, %r2, %r3, %r4;
    setp.ge.u32 %p, %r2, %r1;
    @%p bra DONE;
    cvta.to.global.u64 %rd2, %rd1;
    mul.wide.u32 %rd3, %r2, 4;
    add.s64 %rd4, %rd2, %rd3;
    ld.global.u32 %r5, [%rd4];
    shl.b32 %r5, %r5, 1;
    add.u32 %r5, %r5, %r2;
    st.global.u32 [%rd4], %r5;
DONE:
    ret;
}
"""


def prove(ptx: str) -> dict:
    """Run on an engine: what the CUDA driver says of the devices this process sees."""
    import ctypes
    import os

    gpu = os.environ.get("GLOBULAR_GPU", "")
    out = {"gpu": gpu, "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "ok": False}
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        out["error"] = f"libcuda.so.1: {exc}"
        return out

    def call(name: str, *args: object) -> int:
        return int(getattr(cuda, name)(*args))

    status = call("cuInit", 0)
    count = ctypes.c_int(0)
    if status == 0:
        call("cuDeviceGetCount", ctypes.byref(count))
    out["devices"] = count.value
    if not gpu:  # a CPU engine: no device at all
        out["ok"] = count.value == 0
        return out
    if status != 0 or count.value != 1:
        out["error"] = f"cuInit {status}, {count.value} devices (1 expected)"
        return out
    device = ctypes.c_int()
    call("cuDeviceGet", ctypes.byref(device), 0)
    raw = (ctypes.c_ubyte * 16)()
    getter = "cuDeviceGetUuid_v2" if hasattr(cuda, "cuDeviceGetUuid_v2") else "cuDeviceGetUuid"
    call(getter, raw, device)
    h = bytes(raw).hex()
    uuid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    out["uuid"] = uuid
    if not gpu.endswith(uuid):  # GPU-<uuid> or MIG-<uuid>
        out["error"] = f"the driver's device is {uuid}, the engine was given {gpu}"
        return out
    context, module, function, memory = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_uint64()
    n = 1024
    values = (ctypes.c_uint32 * n)(*range(n))
    steps = [
        ("cuCtxCreate_v2", ctypes.byref(context), 0, device),
        ("cuModuleLoadData", ctypes.byref(module), ctypes.c_char_p(ptx.encode())),
        ("cuModuleGetFunction", ctypes.byref(function), module, b"twice_plus_i"),
        ("cuMemAlloc_v2", ctypes.byref(memory), ctypes.c_size_t(4 * n)),
        ("cuMemcpyHtoD_v2", memory, values, ctypes.c_size_t(4 * n)),
    ]
    for name, *args in steps:
        if call(name, *args) != 0:
            out["error"] = f"{name} failed"
            return out
    pointer, count_arg = ctypes.c_uint64(memory.value), ctypes.c_uint32(n)
    params = (ctypes.c_void_p * 2)(ctypes.addressof(pointer), ctypes.addressof(count_arg))
    launched = call("cuLaunchKernel", function, 4, 1, 1, 256, 1, 1, 0, None, params, None)
    synced = call("cuCtxSynchronize")
    back = (ctypes.c_uint32 * n)()
    copied = call("cuMemcpyDtoH_v2", back, memory, ctypes.c_size_t(4 * n))
    call("cuMemFree_v2", memory)
    call("cuCtxDestroy_v2", context)
    if launched or synced or copied:
        out["error"] = f"cuLaunchKernel {launched}, cuCtxSynchronize {synced}, cuMemcpyDtoH {copied}"
        return out
    out["kernel"] = list(back) == [3 * i for i in range(n)]  # 2*i + i
    out["ok"] = out["kernel"]
    return out


def main() -> int:
    if shutil.which("nvidia-smi") is None:
        print("gpu_check: no nvidia-smi here: skipped (run it on a machine with NVIDIA GPUs)")
        return 0
    import globular

    home = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    config = home / "config"
    config.write_text(
        "[cluster gpu]\nprovider = local\nplugins = ipcluster\n"
        "[plugin ipcluster]\nsetup_class = ipcluster\ngpu_engines = auto\ncpu_engines = 1\n"
    )
    started = time.perf_counter()
    cluster = globular.Cluster.start("gpucheck", "gpu", size=1, config=config, home=home)
    print(f"started in {time.perf_counter() - started:.1f} s")
    failed = 0
    try:
        client = cluster.connect()
        try:
            answers = client[:].apply_async(prove, PTX).get_dict(timeout=300)
        finally:
            client.close()
        for engine_id, answer in sorted(answers.items()):
            failed += not answer["ok"]
            print(f"engine {engine_id}: {'ok  ' if answer['ok'] else 'FAIL'} {answer}")
        gpus = sum(1 for a in answers.values() if a["gpu"])
        print(f"{gpus} GPU engines, {len(answers) - gpus} CPU engines; {failed} failed")
    finally:
        cluster.terminate()
        shutil.rmtree(home, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
