"""medclf: adapt BERT to medical text and classify clinical transcriptions by specialty."""

__version__ = "0.2.0"
