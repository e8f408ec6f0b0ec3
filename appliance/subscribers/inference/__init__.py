"""On-board inference: a model run over windows of frames, the results published on a
derived channel (the subscriber's docstring says how).

    subscriber.py  InferenceSubscriber: windows in, results out, state across crashes
    decode.py      the decode rule: frame payloads -> one model input
    windows.py     the unfinished windows and their state file
    backend.py     the backend interface, and the choice of one from the options
    tflite.py      the LiteRT (TFLite) interpreter on the CPU
    fpga.py        an accelerator in the FPGA fabric (its link protocol: FPGA.md)
    latency.py     latency per window (stats, and the measurement below)
    __main__.py    `python -m appliance.subscribers.inference`: a backend's latency
"""

from appliance.subscribers.inference.subscriber import InferenceSubscriber

# configs name the type "appliance.subscribers.inference:InferenceSubscriber" as well
__all__ = ["InferenceSubscriber"]
