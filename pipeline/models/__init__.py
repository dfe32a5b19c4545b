"""The models: the supported HF architectures, the student's and teacher's HF configs and their
compatibility, what a model directory says it is (the teacher's content identity, an export's marker)."""
