"""The models: supported HF architectures, the student/teacher HF configs, the LM head in chunks, the teacher's identity."""
