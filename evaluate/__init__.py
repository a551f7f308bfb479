"""Verification and identification benchmarks: IJB-B/C (faiss), LFW, CFP-FP, AgeDB."""
