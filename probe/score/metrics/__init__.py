"""The metrics, one module each: CLIP score and CMMD, FID and KID, faces, perceived gender, skin tone, OCR."""
