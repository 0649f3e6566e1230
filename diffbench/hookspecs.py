"""The plugin contract: every hook a diffbench plugin can implement.

A plugin is a module (or object) with functions marked ``@diffbench.hookimpl``. Each hook
receives a ``register`` callback; call it once per component you provide::

    import diffbench
    from diffbench.registry import Sampler

    @diffbench.hookimpl
    def register_samplers(register):
        register(Sampler(name="my-sampler", description="...", family="gaussian",
                         fn=sample_my_sampler, options={"eta": 0.0}))

Plugins are found through the ``diffbench`` entry-point group (built-ins use it too) or
loaded from a file with ``diffbench run --plugin path.py``. The component classes and what
their callables receive are documented in :mod:`diffbench.registry`.
"""
import pluggy

hookspec = pluggy.HookspecMarker("diffbench")


@hookspec
def register_models(register):
    """Register models: ``register(Model(...))``.

    A model's ``load(dataset, device=..., **options)`` returns a :class:`diffbench.denoiser.Denoiser`
    (Gaussian family) or a :class:`diffbench.denoiser.MaskedDenoiser` (masked family), or
    raises :class:`diffbench.registry.Incompatible` when it cannot serve that dataset.
    """


@hookspec
def register_samplers(register):
    """Register samplers: ``register(Sampler(...))``.

    ``fn(denoiser, x, timesteps, *, generator, callback, **options)`` returns the samples.
    """


@hookspec
def register_guidance(register):
    """Register guidance methods: ``register(Guidance(...))``.

    ``apply(denoiser, **options)`` returns a guided denoiser with the same call contract.
    """


@hookspec
def register_datasets(register):
    """Register datasets: ``register(Dataset(...))``; ``load(**options)`` returns a
    :class:`diffbench.data.DataSource`."""


@hookspec
def register_metrics(register):
    """Register metrics: ``register(Metric(...))``; ``compute(samples, ctx, **options)`` returns a
    float or a dict of column name to float."""
