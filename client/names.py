"""The bus contract of hypervisord: its name, object paths, interfaces and job states.

The service exports these names and every client reads them from here, so a renamed
interface is renamed once.
"""
from __future__ import annotations

from dataclasses import dataclass

BUS_NAME = "org.hypersdk.HyperSDK1"
ROOT_PATH = "/org/hypersdk/HyperSDK1"
MANAGER_PATH = ROOT_PATH + "/Manager"
JOBS_PATH = ROOT_PATH + "/jobs"

MANAGER_IFACE = BUS_NAME + ".Manager"
JOB_IFACE = BUS_NAME + ".Job"
SCHEDULE_IFACE = BUS_NAME + ".Schedule"
BACKUP_POLICY_IFACE = BUS_NAME + ".BackupPolicy"
WEBHOOK_IFACE = BUS_NAME + ".Webhook"
PLAN_IFACE = BUS_NAME + ".Plan"
ERROR_PREFIX = BUS_NAME + ".Error."

DBUS_NAME = DBUS_IFACE = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"

JOB_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")


def job_path(job_id: str) -> str:
    return f"{JOBS_PATH}/{job_id.replace('-', '_')}"


def plan_path(plan_id: str) -> str:
    return f"{PLANS_PATH}/{plan_id.replace('-', '_')}"


def job_id_from_path(path: str) -> str:
    return path.rsplit("/", 1)[-1].replace("_", "-")


@dataclass(frozen=True)
class AutomationKind:
    """One kind of automation object: where its objects live and how they are made.

    `name` is also its REST path segment with "_" as "-", its Capabilities feature and
    the folder of its objects below ROOT_PATH.
    """

    name: str
    interface: str
    create_method: str
    run_method: str  # "run now" / "test": a method taking only options

    @property
    def path(self) -> str:
        return f"{ROOT_PATH}/{self.name}"


SCHEDULES = AutomationKind("schedules", SCHEDULE_IFACE, "CreateSchedule", "RunNow")
BACKUP_POLICIES = AutomationKind("backup_policies", BACKUP_POLICY_IFACE,
                                 "CreateBackupPolicy", "Run")
WEBHOOKS = AutomationKind("webhooks", WEBHOOK_IFACE, "ConfigureWebhook", "Test")
AUTOMATION_KINDS = (SCHEDULES, BACKUP_POLICIES, WEBHOOKS)
# migration plans are made and found the same way (not automation: they run once)
PLANS = AutomationKind("plans", PLAN_IFACE, "CreatePlan", "Start")
PLANS_PATH = PLANS.path
