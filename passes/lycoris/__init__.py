"""The LyCORIS methods (LoHa, LoKr): structured products of small factors, with PEFT's rank and
module dropout; `common` holds what they share."""
