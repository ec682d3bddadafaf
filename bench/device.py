"""What a result was measured on: the device, its ceilings, the software, the commit, and GPU telemetry.

Ceilings are measured, not only looked up: a large device-to-device copy gives the memory bandwidth the
device actually reaches (read + write bytes over time), a large matmul the FLOP/s (bf16 on a GPU, fp32 on a
CPU, whose half-precision matmul is not its peak). The datasheet value for the GPU's name is stored beside
them (dense, no sparsity), so "% of peak" can be read against either.

Telemetry comes from nvidia-ml-py (pynvml), imported only when a CUDA device is used; a background thread
samples clocks, power, temperature, memory and utilisation while the benchmark runs.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import threading
import time

import torch

from llava_fast.bench.timing import summarize, time_repeats

# Datasheet peaks, dense (no 2:4 sparsity): bf16 tensor-core TFLOP/s with fp32 accumulation, memory GB/s.
# Matched against the CUDA device name in order (more specific names first).
DATASHEET = [
    ("H200", {"model": "H200 SXM", "bf16_tflops": 989.0, "bandwidth_gbps": 4800.0}),
    ("H100 NVL", {"model": "H100 NVL", "bf16_tflops": 835.0, "bandwidth_gbps": 3900.0}),
    ("H100 PCIe", {"model": "H100 PCIe", "bf16_tflops": 756.0, "bandwidth_gbps": 2000.0}),
    ("H100", {"model": "H100 SXM5", "bf16_tflops": 989.0, "bandwidth_gbps": 3350.0}),
    ("A100-SXM4-80GB", {"model": "A100 SXM4 80GB", "bf16_tflops": 312.0, "bandwidth_gbps": 2039.0}),
    ("A100 80GB PCIe", {"model": "A100 PCIe 80GB", "bf16_tflops": 312.0, "bandwidth_gbps": 1935.0}),
    ("A100", {"model": "A100 40GB", "bf16_tflops": 312.0, "bandwidth_gbps": 1555.0}),
    ("L40S", {"model": "L40S", "bf16_tflops": 362.0, "bandwidth_gbps": 864.0}),
    ("L4", {"model": "L4", "bf16_tflops": 121.0, "bandwidth_gbps": 300.0}),
]


def datasheet_peaks(name: str | None) -> dict | None:
    for key, peaks in DATASHEET:
        if name and key.lower() in name.lower():
            return dict(peaks)
    return None


def resolve_device(device=None) -> torch.device:
    from llava_fast.errors import InputError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"--device {device!r}: {e}") from None
    if d.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: expected cpu or cuda")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available")
    return d


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    info = {
        "type": device.type,
        "host": {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "platform": platform.platform(),
                 "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["name"] = props.name
        info["gpu"] = {
            "name": props.name, "index": index, "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count, "memory_total_bytes": int(props.total_memory),
            "l2_cache_bytes": int(getattr(props, "L2_cache_size", 0)) or None,
            "driver": nvml_static(index).get("driver"),
        }
    else:
        info["name"] = info["host"]["cpu"]
    info["last_level_cache_bytes"] = last_level_cache_bytes(device)
    return info


def device_slug(info: dict) -> str:
    """A file-name-safe device name: 'nvidia-h100-80gb-hbm3' or 'cpu-intel-xeon-processor-2c'."""
    if info["type"] == "cuda":
        raw = info["name"]
    else:
        raw = f"cpu {info['host']['cpu']} {info['host']['cores']}c"
    raw = re.sub(r"\((r|tm)\)", "", raw, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


def software_versions() -> dict:
    """Versions from package metadata: nothing heavy (transformers) is imported to learn its version."""
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for dist in ("llava-fast", "triton", "transformers", "numpy", "nvidia-ml-py", "pytest-benchmark"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit() -> dict:
    """The checkout the package runs from: sha and whether tracked files differ from it (None if not a
    git checkout, e.g. an installed wheel)."""
    import llava_fast

    root = os.path.dirname(os.path.dirname(os.path.abspath(llava_fast.__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha or None, "dirty": bool(dirty)}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def command_line(argv) -> str:
    return " ".join(["llava-fast", "bench", *argv])


# ------------------------------------------------------------------------------------------------------
# Ceilings
# ------------------------------------------------------------------------------------------------------


def measure_ceilings(device: torch.device, *, repeats: int = 10) -> dict:
    """{"bandwidth": {...}, "matmul": {...}}: measured beside the datasheet.

    "measured" is the best of the repeats (a ceiling is what the device can reach; interference from other
    work only lowers a sample), with all samples' order statistics beside it.

    Copy: GPU 1 GiB bf16, CPU 128 MiB fp32; bytes moved = 2 x size (read + write). Matmul: GPU 8192^3 bf16,
    CPU 2048^3 fp32; FLOPs = 2 n^3. Inputs random (never zeros: some hardware is faster on zeros).
    """
    cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    reps = repeats if cuda else max(3, repeats // 2)
    n_copy = (2**29) if cuda else (2**25)
    copy_dtype = torch.bfloat16 if cuda else torch.float32
    copy_bytes = 2 * n_copy * torch.empty((), dtype=copy_dtype).element_size()
    n = 8192 if cuda else 2048
    mm_dtype = torch.bfloat16 if cuda else torch.float32

    def time_copy():  # the buffers are freed when this returns
        src = torch.rand(n_copy, device=device, dtype=copy_dtype, generator=g)
        dst = torch.empty_like(src)
        return time_repeats(lambda: dst.copy_(src), device=device, repeats=reps, warmup=2)

    def time_matmul():
        a = torch.randn(n, n, device=device, dtype=mm_dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=mm_dtype, generator=g)
        return time_repeats(lambda: a @ b, device=device, repeats=reps, warmup=2)

    t_copy, t_mm = time_copy(), time_matmul()
    if cuda:
        torch.cuda.empty_cache()
    bw = [copy_bytes / t / 1e9 for t in t_copy]
    fl = [2 * n**3 / t / 1e12 for t in t_mm]
    sheet = datasheet_peaks(torch.cuda.get_device_name(device)) if cuda else None
    return {
        "bandwidth": {"unit": "GB/s", "measured": max(bw), "stats": summarize(bw),
                      "method": f"best of {len(bw)}: copy_ of {n_copy * (2 if cuda else 4) / 2**20:.0f} MiB "
                                f"{str(copy_dtype)[6:]}, bytes = read + write",
                      "datasheet": sheet["bandwidth_gbps"] if sheet else None},
        "matmul": {"unit": "TFLOP/s", "dtype": str(mm_dtype).replace("torch.", ""),
                   "measured": max(fl), "stats": summarize(fl),
                   "method": f"best of {len(fl)}: {n}x{n} @ {n}x{n}, FLOPs = 2 n^3",
                   "datasheet": sheet["bf16_tflops"] if sheet else None},
        "datasheet_model": sheet["model"] if sheet else None,
    }


def last_level_cache_bytes(device: torch.device) -> int | None:
    """The largest cache in front of memory: a GPU's L2; a CPU's highest-level cache as sysfs gives it (the
    size of one instance, which for a shared L3 is the whole of it); None when unknown."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device.index if device.index is not None else 0)
        return int(getattr(props, "L2_cache_size", 0)) or None
    best = (0, None)
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(root):
            if not entry.startswith("index"):  # "uevent" sits beside index0..N on some kernels
                continue
            with open(os.path.join(root, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip()  # "491520K"
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
            best = max(best, (level, size))
    except (OSError, ValueError):
        return None
    return best[1]


def measure_read_bandwidth(device: torch.device, cache_bytes: int | None, *, repeats: int = 5) -> dict:
    """The read rate a decode step is bound by: x.sum() over a buffer at least twice the last-level cache (so
    it streams from memory, not from the cache), 256 MiB at least on a CPU, 1 GiB on a GPU; bytes = the
    buffer read once (the sum writes one number). A ceiling dict as measure_ceilings' (best of the repeats).
    The copy ceiling (read + write) is not it: a copy moves two bytes per byte read, at a different rate."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    size = max(2 * (cache_bytes or 0), (1 << 30) if cuda else (256 << 20))
    x = torch.rand(size // torch.empty((), dtype=dtype).element_size(), device=device, dtype=dtype,
                   generator=torch.Generator(device=device).manual_seed(0))
    nbytes = x.numel() * x.element_size()
    times = time_repeats(x.sum, device=device, repeats=repeats if not cuda else 2 * repeats, warmup=1)
    del x
    if cuda:
        torch.cuda.empty_cache()
    rates = [nbytes / t / 1e9 for t in times]
    sheet = datasheet_peaks(torch.cuda.get_device_name(device)) if cuda else None
    return {"unit": "GB/s", "measured": max(rates), "stats": summarize(rates),
            "method": f"best of {len(rates)}: sum() over {nbytes / 2**20:.0f} MiB {str(dtype)[6:]}, bytes = read",
            "datasheet": sheet["bandwidth_gbps"] if sheet else None}


def peak(ceilings: dict, which: str) -> tuple[float, str]:
    """The ceiling '% of peak' is read against: the datasheet when known, else the measured one."""
    c = ceilings[which]
    return (c["datasheet"], "datasheet") if c.get("datasheet") else (c["measured"], "measured")


# ------------------------------------------------------------------------------------------------------
# Telemetry (nvidia-ml-py)
# ------------------------------------------------------------------------------------------------------


def _nvml():
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / no NVML library
        return None
    return pynvml


def _nvml_handle(nv, index):
    """The NVML handle of torch's device `index` (by UUID, which survives CUDA_VISIBLE_DEVICES remapping)."""
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:
        return nv.nvmlDeviceGetHandleByIndex(index)


def _decode(s):
    return s.decode() if isinstance(s, bytes) else s


def nvml_static(index) -> dict:
    nv = _nvml()
    if nv is None:
        return {}
    out = {}
    try:
        h = _nvml_handle(nv, index)
        out["driver"] = _decode(nv.nvmlSystemGetDriverVersion())
        out["name"] = _decode(nv.nvmlDeviceGetName(h))
        out["max_sm_clock_mhz"] = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)
        out["max_mem_clock_mhz"] = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)
        out["power_limit_w"] = nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1e3
    except Exception as e:
        out["error"] = str(e)
    return out


TELEMETRY_FIELDS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c", "memory_used_bytes",
                    "gpu_util_pct")


class Telemetry:
    """Samples the GPU every `interval_s` on a daemon thread between start() and stop().

    On a CPU, or without nvidia-ml-py / NVML, it records why it is unavailable and samples nothing."""

    def __init__(self, device: torch.device, interval_s: float = 0.2):
        self.device, self.interval_s = device, interval_s
        self.samples: list[dict] = []
        self.static: dict = {}
        self.reason = None
        self._stop = threading.Event()
        self._thread = None
        self._t0 = None

    def start(self):
        if self.device.type != "cuda":
            self.reason = "not a CUDA device"
            return self
        nv = _nvml()
        if nv is None:
            self.reason = "nvidia-ml-py (pynvml) not installed or NVML not available"
            return self
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.static = nvml_static(index)
        handle = _nvml_handle(nv, index)
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(nv, handle), daemon=True)
        self._thread.start()
        return self

    def _run(self, nv, h):
        while not self._stop.is_set():
            try:
                self.samples.append({
                    "t_s": round(time.perf_counter() - self._t0, 3),
                    "sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                    "mem_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
                    "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1e3,
                    "temperature_c": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                    "memory_used_bytes": int(nv.nvmlDeviceGetMemoryInfo(h).used),
                    "gpu_util_pct": nv.nvmlDeviceGetUtilizationRates(h).gpu,
                })
            except Exception as e:  # a transient NVML error ends sampling, never the benchmark
                self.reason = f"sampling stopped: {e}"
                return
            self._stop.wait(self.interval_s)

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def to_dict(self, max_samples: int = 2000) -> dict:
        samples = self.samples
        if len(samples) > max_samples:  # keep the file small on long runs: evenly spaced subset
            step = len(samples) / max_samples
            samples = [samples[int(i * step)] for i in range(max_samples)]
        summary = {}
        for field in TELEMETRY_FIELDS:
            values = [s[field] for s in self.samples if s.get(field) is not None]
            if values:
                summary[field] = summarize(values)
        return {"available": bool(self.samples), "reason": None if self.samples else self.reason,
                "interval_s": self.interval_s, "static": self.static, "summary": summary, "samples": samples}
