"""The deterministic sample data set: MVImgNet, OpenImages V7 and DreamBench in their real formats.

Plain functions do the work (plan, render, mvimgnet, openimages, dreambench, faults, generate);
``flows.sample.flow`` wraps them in a Prefect flow and ``python -m flows.sample`` runs it.
"""
