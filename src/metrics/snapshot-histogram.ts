/**
 * A Prometheus histogram whose observations are made elsewhere — here, by queue workers into the shared
 * counter buffer — and read at scrape time.
 *
 * Why a subclass: prom-client's `Histogram` can only be fed with `observe()`, one value at a time, and keeps
 * its buckets privately, so a histogram counted by another thread cannot be set into it. Rendering that
 * family's exposition text by hand next to the registry's would bypass the registry (content types,
 * `getMetricsAsJSON`, name clashes). Instead this class IS a prom-client Histogram (type `histogram`,
 * registered in the registry like any metric) whose `get()` builds the values from a snapshot function:
 * cumulative `_bucket{le=...}` series ending with `le="+Inf"`, then `_sum` and `_count`, exactly the shape
 * prom-client's own Histogram produces, so the registry renders it with its normal code path. The registry
 * prefers `getForPromString()` when a metric has it (prom-client 15 Histogram does), so both are provided.
 * `observe()` and `startTimer()` throw: observations only come from the snapshot.
 */
import { Histogram, type Registry } from 'prom-client';

export interface HistogramSnapshot<T extends string> {
  labels: Record<T, string>;
  /** Non-cumulative counts, one per upper bound, then one for +Inf. */
  buckets: readonly number[];
  sum: number;
}

type HistogramData<T extends string> = Awaited<ReturnType<Histogram<T>['get']>>;
type HistogramValue<T extends string> = HistogramData<T>['values'][number];

export interface SnapshotHistogramConfig<T extends string> {
  name: string;
  help: string;
  labelNames: readonly T[];
  /** Upper bounds in ascending order (+Inf implied). */
  buckets: readonly number[];
  registers: Registry[];
  snapshot: () => Iterable<HistogramSnapshot<T>>;
}

export class SnapshotHistogram<T extends string> extends Histogram<T> {
  private readonly bounds: readonly number[];
  private readonly snapshot: () => Iterable<HistogramSnapshot<T>>;
  private readonly family: string;
  private readonly helpText: string;

  constructor(config: SnapshotHistogramConfig<T>) {
    super({
      name: config.name,
      help: config.help,
      labelNames: config.labelNames,
      buckets: [...config.buckets],
      registers: config.registers,
    });
    this.bounds = [...config.buckets];
    this.snapshot = config.snapshot;
    this.family = config.name;
    this.helpText = config.help;
    const refuse = (): never => {
      throw new Error(`${config.name} is read from shared counters; it cannot be observed directly`);
    };
    this.observe = refuse;
    this.startTimer = refuse;
  }

  override async get(): Promise<HistogramData<T>> {
    // prom-client's Metric constructor sets `type` and `aggregator` on the instance; its typings omit them.
    const { type, aggregator } = this as unknown as Pick<HistogramData<T>, 'type' | 'aggregator'>;
    return { name: this.family, help: this.helpText, type, aggregator, collect: () => undefined, values: this.values() };
  }

  /** Used by Registry.metrics() in preference to get(); the values are already in their final shape. */
  getForPromString(): Promise<HistogramData<T>> {
    return this.get();
  }

  private values(): HistogramValue<T>[] {
    const values: HistogramValue<T>[] = [];
    for (const series of this.snapshot()) {
      if (series.buckets.length !== this.bounds.length + 1) {
        throw new Error(`${this.family}: snapshot has ${series.buckets.length} buckets, expected ${this.bounds.length + 1}`);
      }
      let cumulative = 0;
      this.bounds.forEach((bound, i) => {
        cumulative += series.buckets[i] ?? 0;
        values.push({ metricName: `${this.family}_bucket`, labels: { ...series.labels, le: bound }, value: cumulative });
      });
      cumulative += series.buckets[this.bounds.length] ?? 0;
      values.push({ metricName: `${this.family}_bucket`, labels: { ...series.labels, le: '+Inf' }, value: cumulative });
      values.push({ metricName: `${this.family}_sum`, labels: { ...series.labels }, value: series.sum });
      values.push({ metricName: `${this.family}_count`, labels: { ...series.labels }, value: cumulative });
    }
    return values;
  }
}
