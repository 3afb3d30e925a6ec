"""FMCTTrainingLib: the logic of the FMCTTraining Slicer module (engine commands in a subprocess).

Imports with plain Python; scripts and tests use `from FMCTTrainingLib.logic import FMCTTrainingLogic`
with FMCTTraining/ on sys.path.
"""
