"""The findings the models know: their names, in output order, and what each one means.

One torch-free home for the task list, so the phantom generator (which draws and labels these
findings), the real-data manifests (which map RSNA and CQ500 labels onto them) and the trainers
(which build one output per task, in this order) can never disagree about a name or its position.
"""
from __future__ import annotations

TASKS: tuple[str, ...] = (
    "any_hemorrhage", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "epidural",
    "fracture", "mass_effect", "midline_shift",
)
HEMORRHAGE_TYPES: tuple[str, ...] = ("intraparenchymal", "intraventricular", "subarachnoid", "subdural", "epidural")

TASK_DESCRIPTIONS: dict[str, str] = {
    "any_hemorrhage": "Any intracranial hemorrhage",
    "intraparenchymal": "Intraparenchymal hemorrhage",
    "intraventricular": "Intraventricular hemorrhage",
    "subarachnoid": "Subarachnoid hemorrhage",
    "subdural": "Subdural hematoma",
    "epidural": "Epidural hematoma",
    "fracture": "Skull fracture",
    "mass_effect": "Mass effect",
    "midline_shift": "Midline shift of 5 mm or more",
}
