"""The diffusion teacher: the ResShift process (``diffusion``), the frozen sampler (``teacher``) and
the teacher-output cache (``cache``). Networks come from ``dtkd_arch``; nothing here is registered.
"""
import dtkd_compat  # noqa: F401  (must precede basicsr)
