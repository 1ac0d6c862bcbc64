"""The lab: throwaway servers, the demo and the benchmark."""
