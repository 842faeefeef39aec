"""The engine side: the vLLM engine behind the narrow handle heads use, its arguments,
placement and quantization, prompt tokens and label scoring, and the processes and Ray
session a run owns."""
