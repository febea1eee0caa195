"""The data side: source adapters -> manifest -> label scheme -> split -> cache -> CXR-Norm."""
