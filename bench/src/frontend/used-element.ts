/** One entry the back-end put in a used ring, plus the token the driver attached when it made the chain available. */
export interface UsedElement {
  /** Head descriptor index of the completed chain. */
  id: number;
  /** Bytes the back-end says it wrote into the chain's writable buffers. */
  len: number;
  /** Whatever the submitter attached to the chain (undefined for raw or unknown chains). */
  token: unknown;
}
