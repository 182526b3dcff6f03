"""Student models: built from a teacher's layers (:mod:`.init`) or the BiLSTM of Tang et al."""
from distilkit.students.init import pick_layers, student_from_config, student_from_teacher

__all__ = ["pick_layers", "student_from_config", "student_from_teacher"]
