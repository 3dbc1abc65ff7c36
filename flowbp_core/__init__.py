"""FlowBP core: the mathematics and model glue of reward backpropagation for flow-matching models.

Imports no ray, fastapi or redis: everything here runs in a plain Python process, a Ray actor or a test alike.
"""

__version__ = "0.1.0"
