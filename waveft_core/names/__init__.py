"""Layer names: model families and the PEFT/diffusers/native spellings (families), the DiTs' diffusers names
(dit), the shapes a base model gives each layer (layouts), and which model layer a file's layer patches
(matching)."""
