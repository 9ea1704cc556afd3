from lora_fixtures import peft_lora_file  # noqa: F401  (session fixture)
