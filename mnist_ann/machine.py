"""What a measurement ran on: CPU, cores, library versions, FAISS's SIMD level, BLAS."""

from __future__ import annotations

import os
import platform
import resource

import faiss
import numpy as np
import sklearn

from mnist_ann.build import simd_level


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_description() -> str:
    from threadpoolctl import threadpool_info

    return ", ".join(sorted({f"{i['internal_api']} {i.get('version') or ''} "
                             f"{i.get('architecture') or ''}".strip()
                             for i in threadpool_info() if i["user_api"] == "blas"})) or "unknown"


def describe_machine() -> dict:
    """CPU, cores, and the versions and SIMD level of what does the arithmetic."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas_description(),
            "scikit-learn": sklearn.__version__, "faiss": faiss.__version__,
            "faiss_simd": simd_level()}


def peak_memory_mb() -> float:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
