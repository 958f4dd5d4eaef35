"""What the captioning job, dataset preparation, the report and the Python API share: the
pieces below every entry point, so that none imports another's internals.

    elements       what the stages pass: SourceFile, FileData, ImageExample; ERRORS, NAMESPACE
    bounded_reads  whole files read up to a size limit, in chunks (regular files only)
    readahead      the read-ahead thread-pool DoFn base
    cpus           CPUs available under affinity masks and cgroup quotas
    read           ReadImages: size refusal, dedupe, read + decode ahead
    inference      RunInference model handlers: captions, CNN features
    model_loading  background model load, GC freeze, Beam log filter
    dead_letters   RunInference's failed batches -> error records (or a failed run)

Nothing here imports the job, prepare or the report; this `__init__` imports nothing, so
importing one module of the package runs no other.
"""
