/**
 * Every vublk error derives from VublkError (defined in protocol/errors.ts so the pure protocol layer can
 * use it too). Import it from here everywhere in src/.
 */
export { VublkError, isVublkError, type VublkErrorOptions } from '../protocol/errors.js';
