"""Object paths of the service's objects."""
from __future__ import annotations

BUS_NAME = "org.hypersdk.HyperSDK1"
ROOT_PATH = "/org/hypersdk/HyperSDK1"
MANAGER_PATH = ROOT_PATH + "/Manager"
JOBS_PATH = ROOT_PATH + "/jobs"


def job_path(job_id: str) -> str:
    return f"{JOBS_PATH}/{job_id.replace('-', '_')}"


def job_id_from_path(path: str) -> str:
    return path.rsplit("/", 1)[-1].replace("_", "-")
