VerifierPool = None
verify_rows = None
