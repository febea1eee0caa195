"""Search spaces: one YAML file says everything a hyperparameter search needs.

A search-space file has these top-level sections::

    name: demo                   # optional; default: the file's stem
    data: {...}                  # DataConfig fields (the image cache is built once per search)
    fixed: {...}                 # TrialConfig sections (except data/output_dir) every trial shares
    space:                       # searched parameters, dotted TrialConfig keys, in sampling order
      optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
      optimizer.sam: {choice: [none, sam]}
      optimizer.rho: {uniform: [0.01, 0.2], when: {optimizer.sam: sam}}
      preprocess.tile_grid: {int: [4, 16, 4]}          # optional step
      loss.gamma: {quniform: [0.5, 3.0, 0.5]}          # low, high, q
    search: {algorithm, scheduler: {name, grace_period, reduction_factor, max_epochs},
             metric, mode, objectives, select, cost_repeats, cv, cv_test,
             num_samples, max_concurrent, time_budget_s, seed}
    resources: {cpu, gpu}        # per trial; fractional gpu shares a device
    tracking: {uri, experiment, register_model}
    storage: {path, keep_checkpoints}
    report: {explain, resamples} # what the finished search's report computes

A parameter with ``when`` is only sampled when every condition holds for the values
already drawn (conditions may only use parameters declared above it); otherwise it is
absent from the trial's point and the component default or the fixed value applies.

:func:`load_spec` validates everything before Ray starts and raises one ConfigError
listing every problem with the file and the key. Beyond types and ranges it probes
each parameter's candidate values (choices, range ends, a middle value) by building
the trial config they give and running the components' own ``validate``.

The package is split by concern: ``spec`` (dataclasses, searchable keys), ``load``
(file, overrides, parsing), ``check`` (probing values through the components) and
``sampling`` (Optuna / grid). It never imports Ray; :func:`define_by_run`, :func:`optuna_sampler` and
:func:`grid_points` give the driver what it hands to Ray Tune.
"""

from .check import check_inputs
from .load import bundled_spaces, load_spec, resolve_space_path
from .sampling import DefineByRun, define_by_run, grid_points, optuna_sampler
from .spec import (ALGORITHMS, BUNDLED_DIR, KINDS, SCHEDULERS, Param, ReportConfig, Resources, SchedulerSpec,
                   SearchSettings, SearchSpec, StorageConfig, TrackingConfig)

__all__ = ["Param", "SchedulerSpec", "SearchSettings", "Resources", "TrackingConfig", "StorageConfig", "ReportConfig",
           "SearchSpec", "load_spec", "check_inputs", "define_by_run", "DefineByRun", "grid_points", "optuna_sampler",
           "BUNDLED_DIR", "resolve_space_path", "bundled_spaces", "KINDS", "ALGORITHMS", "SCHEDULERS"]
