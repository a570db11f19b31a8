//! A raw ring writer that plays a hostile driver (being written).
