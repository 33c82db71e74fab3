"""Model organisms: small models the field studies, with a known ground truth, trained here."""
