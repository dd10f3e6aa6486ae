"""Identity data: the procedural face world, real-photo folders, tfds builders, protocol and episodes.

Modules: ``world`` (renderer, traits, attributes, captions), ``folders`` (real photos on disk), ``builders``
(tfds ``synth_identities`` / ``identity_folders``), ``protocol`` (splits, references, held-out, prompts),
``episodes`` (few-shot episode sampler), ``preview`` (contact sheets).
"""
