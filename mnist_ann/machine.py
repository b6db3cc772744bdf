"""What a measurement ran on: CPU, cores, library versions, SIMD levels, BLAS."""

from __future__ import annotations

import platform
import resource

from mnist_ann.runtime import default_threads


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def simd_level() -> str:
    """The SIMD level FAISS runs with (AVX2, AVX512, NEON, ...)."""
    import faiss

    config = getattr(faiss, "SIMDConfig", None)
    if config is not None and hasattr(config, "get_level_name"):
        return str(config.get_level_name())
    options = faiss.get_compile_options().split()
    return next((o for o in options if o not in ("OPTIMIZE", "DD")), "generic")


def blas_description() -> str:
    from threadpoolctl import threadpool_info

    return ", ".join(sorted({f"{i['internal_api']} {i.get('version') or ''} "
                             f"{i.get('architecture') or ''}".strip()
                             for i in threadpool_info() if i["user_api"] == "blas"})) or "unknown"


def describe_machine() -> dict:
    """CPU, cores, and the versions and SIMD levels of what does the arithmetic (FAISS's, and
    the instruction set of mnist-ann's compiled kernels)."""
    import faiss
    import numpy as np
    import sklearn

    from mnist_ann.kernels import kernels

    compiled = kernels()
    if compiled is not None:
        used = compiled.name
    elif kernels("portable") is not None:
        used = "none (no AVX-512 VNNI: FAISS instead)"
    else:
        used = "none (not built: FAISS instead)"
    return {"cpu": cpu_model(), "cores": default_threads(), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas_description(),
            "scikit-learn": sklearn.__version__, "faiss": faiss.__version__,
            "faiss_simd": simd_level(),
            "kernels": used}


def peak_memory_mb() -> float:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
