"""Operations plane: metrics, logging, health."""
