"""Commands built on the job: study sweeps, run analysis, ahead-of-time accelerator compiles."""
