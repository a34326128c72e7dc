"""The stages of the GPU check that ``scripts/gpu_check.py`` drives: ``plan`` (every shape, budget
and limit), ``record`` (the JSON written after every record, the time bounds), ``common`` (inputs,
errors, the timer), ``environment``, ``compile``, ``correctness``, ``timings``. Import them only
after ``TRITON_INTERPRET`` is decided: the driver sets it for ``--cpu-smoke`` first."""
