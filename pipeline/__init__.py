"""seqcarry's pipeline: options and CLI, pipeline construction, storage and commit.

Entry points: :func:`pipeline.build.run` (argv, like Beam's wordcount) and
:func:`pipeline.build.run_job` (a :class:`pipeline.build.RunConfig`).
"""
