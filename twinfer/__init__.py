"""twinfer: a quantization-focused LLM inference engine.

    from twinfer import LLM, SamplingParams
    llm = LLM("smollm2-135m")
    print(llm.generate("The capital of France is", SamplingParams(max_tokens=8))[0].outputs[0].text)
"""

from twinfer.llm import LLM
from twinfer.outputs import CompletionOutput, Logprob, RequestOutput
from twinfer.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
